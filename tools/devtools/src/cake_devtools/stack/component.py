"""What every stack component (server process) offers the orchestrator.

A component knows how to start its process detached, wait until it really serves (not just
until the process exists), report its status cheaply, and stop it. Readiness failures name the
component and its log file and quote the end of the log, with passwords scrubbed.
"""

from __future__ import annotations

import abc
import os
import shutil
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from pathlib import Path

from cake_devtools.stack import credentials, process
from cake_devtools.stack.errors import StackError
from cake_devtools.stack.layout import RunLayout
from cake_devtools.stack.settings import StackSettings, port_env_var

#: Roles (and the PostgreSQL superuser) that get a generated password.
PASSWORD_NAMES = (
    credentials.POSTGRES_SUPERUSER,
    "cake_auth",
    "cake_promotions",
    "cake_events",
    "cake_relay",
    "cake_payments",
    "cake_notifications",
)


class State(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    #: Served by a server the stack does not run (``CAKE_EXTERNAL_*``).
    EXTERNAL = "external"
    #: Cannot run yet (service not written, descriptor set not generated).
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    state: State
    #: The component answers its health probe (connect, PING, gRPC health, HTTP).
    healthy: bool
    address: str
    pid: int | None = None
    log_path: Path | None = None
    detail: str = ""

    @property
    def running(self) -> bool:
        """Serving or supposed to be: our process is up, or an external server is used."""
        return self.state in (State.RUNNING, State.EXTERNAL)


@dataclass
class StackContext:
    """Shared by the components of one profile."""

    profile: str
    settings: StackSettings
    layout: RunLayout
    echo: Callable[[str], None] = field(default=print)

    @cached_property
    def passwords(self) -> dict[str, str]:
        self.layout.make_dirs()
        return credentials.load_or_create(self.layout.secrets_file, PASSWORD_NAMES)

    def redact(self, text: str) -> str:
        return credentials.redact(text, self.passwords.values())

    def port_env_var(self, field_name: str) -> str:
        return port_env_var(self.profile, field_name)


class Component(abc.ABC):
    #: Set by subclasses (a class attribute, or per instance for the services).
    name: str

    def __init__(self, ctx: StackContext) -> None:
        self.ctx = ctx

    @property
    def log_path(self) -> Path:
        return self.ctx.layout.log(self.name)

    def unavailable_reason(self) -> str | None:
        """Why this component cannot run in this checkout yet, or None."""
        return None

    def restart_reason(self) -> str | None:
        """Why a running instance is stale and ``up`` must restart it, or None."""
        return None

    @abc.abstractmethod
    def status(self) -> ComponentStatus: ...

    @abc.abstractmethod
    def start(self) -> None:
        """Start the process unless it already runs (returns without waiting)."""

    @abc.abstractmethod
    def wait_ready(self, deadline: float) -> None:
        """Block until the component serves (and is provisioned), or raise StackError."""

    @abc.abstractmethod
    def stop(self) -> None: ...

    @abc.abstractmethod
    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the component's processes without waiting (fault tests)."""

    def fail(self, message: str) -> StackError:
        """A StackError naming this component and quoting the end of its log."""
        excerpt = self.ctx.redact(process.tail(self.log_path))
        text = f"{self.name}: {message}\n  log: {self.log_path}"
        if excerpt:
            lines = (
                line if len(line) <= 300 else line[:300] + "..." for line in excerpt.splitlines()
            )
            text += "\n  last lines:\n" + "\n".join(f"    {line}" for line in lines)
        return StackError(text)

    def wait_until(
        self,
        check: Callable[[], bool],
        *,
        what: str,
        deadline: float,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        """Poll ``check`` until it holds; fail early if ``alive`` says the process died."""
        delay = 0.1
        while True:
            if check():
                return
            if alive is not None and not alive():
                raise self.fail(f"exited while waiting for {what}")
            if time.monotonic() >= deadline:
                raise self.fail(f"timed out waiting for {what}")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def ensure_port_free(self, port: int, field_name: str) -> None:
        if process.port_open("127.0.0.1", port):
            raise StackError(
                f"{self.name}: port {port} is already in use by a process this stack did not "
                f"start; stop it or choose another port with {self.ctx.port_env_var(field_name)}"
            )


class ProcessComponent(Component):
    """A server the stack runs as one detached process (group) with a pid file."""

    #: Settings field of the port the process listens on (for messages and conflicts).
    port_field: str

    @property
    def port(self) -> int:
        value = getattr(self.ctx.settings, self.port_field)
        assert isinstance(value, int)
        return value

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.ctx.layout.pid_file(self.name)

    def record(self) -> process.ProcessRecord | None:
        return process.read_record(self.pid_file)

    @abc.abstractmethod
    def command(self) -> Sequence[str]:
        """argv of the server, argv[0] absolute."""

    def environment(self) -> Mapping[str, str]:
        return os.environ

    def prepare(self) -> None:
        """Write config files, initialise data dirs; runs before every start."""

    def probe(self) -> bool:
        """Cheap health probe for ``status``."""
        return process.port_open("127.0.0.1", self.port)

    def status(self) -> ComponentStatus:
        reason = self.unavailable_reason()
        record = self.record()
        if record is None:
            state = State.UNAVAILABLE if reason else State.STOPPED
            return ComponentStatus(
                self.name, state, False, self.address, log_path=self.log_path, detail=reason or ""
            )
        return ComponentStatus(
            self.name, State.RUNNING, self.probe(), self.address, record.pid, self.log_path
        )

    def start(self) -> None:
        if self.record() is not None:
            return
        self.ensure_port_free(self.port, self.port_field)
        self.prepare()
        argv = self.command()
        with self.log_path.open("a", encoding="utf-8") as log:
            log.write(f"\n--- cake-stack: starting {self.name} at {time.strftime('%F %T')} ---\n")
        process.spawn(argv, log_path=self.log_path, env=self.environment(), pid_file=self.pid_file)

    def alive(self) -> bool:
        return self.record() is not None

    def stop(self) -> None:
        record = self.record()
        if record is None:
            return
        process.terminate(record, grace=self.ctx.settings.stop_grace_seconds)
        self.pid_file.unlink(missing_ok=True)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        record = self.record()
        if record is None:
            raise StackError(f"{self.name} is not running")
        process.signal_group(record, sig)
        if sig == signal.SIGKILL:
            process.wait_gone(record, timeout=10)
            self.pid_file.unlink(missing_ok=True)


def require_binary(name: str, hint: str) -> str:
    """Absolute path of an executable on PATH, or a StackError saying how to get it."""
    path = shutil.which(name)
    if path is None:
        raise StackError(f"{name} not found on PATH; {hint}")
    return path
