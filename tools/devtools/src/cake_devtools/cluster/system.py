"""Running commands, finding daemons in /proc, apt installs, and the progress lines."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from cake_devtools.cluster.errors import ClusterError
from cake_devtools.cluster.layout import SYSTEM_PATH


def daemon_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for daemons and tools: ours, with the system sbin dirs on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{SYSTEM_PATH}:{env['PATH']}" if env.get("PATH") else SYSTEM_PATH
    if extra:
        env.update(extra)
    return env


def which(name: str) -> str:
    """Absolute path of ``name`` on the daemon PATH, or a ClusterError naming it."""
    found = shutil.which(name, path=daemon_env()["PATH"])
    if found is None:
        raise ClusterError(f"{name} not found on PATH")
    return found


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | bytes | None = None,
    timeout: float | None = 600,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, capturing its output as text.

    With ``check`` a non-zero exit raises a ClusterError that ends with the command's output.
    """
    try:
        result = subprocess.run(
            list(argv),
            input=input.decode() if isinstance(input, bytes) else input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else daemon_env(),
            cwd=cwd,
            check=False,
        )
    except FileNotFoundError as exc:
        raise ClusterError(f"{argv[0]} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(f"{' '.join(argv)} did not finish within {timeout}s") from exc
    if check and result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()[-25:]
        raise ClusterError(f"{' '.join(argv)} exited {result.returncode}:\n" + "\n".join(output))
    return result


def succeeds(argv: Sequence[str], timeout: float = 10) -> bool:
    """True if the command exits 0 within ``timeout`` (missing binaries count as failure)."""
    try:
        return run(argv, check=False, timeout=timeout).returncode == 0
    except ClusterError:
        return False


def wait_until(
    what: str,
    probe: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.5,
    log: Path | None = None,
) -> None:
    """Poll ``probe`` until it returns True; after ``timeout`` fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        if probe():
            return
        if time.monotonic() >= deadline:
            hint = f"; see {log}" if log else ""
            raise ClusterError(f"{what} not ready within {timeout:.0f}s{hint}")
        time.sleep(interval)


def pids_named(comm: str) -> list[int]:
    """Pids of live processes whose command name (``/proc/<pid>/comm``) is exactly ``comm``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != comm:
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            found.append(int(entry.name))
    return sorted(found)


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def require_root() -> None:
    if os.geteuid() != 0:
        raise ClusterError("cake-cluster manages system daemons, links and iptables: run as root")


# --- Debian packages ---------------------------------------------------------------------------


def missing_packages(packages: Sequence[str]) -> list[str]:
    """The packages dpkg does not report as installed."""
    result = run(["dpkg-query", "-W", "-f=${Package} ${Status}\n", *packages], check=False)
    installed = {
        line.split()[0]
        for line in result.stdout.splitlines()
        if line.endswith(" install ok installed")
    }
    return [name for name in packages if name not in installed]


def apt_install_command(packages: Sequence[str]) -> list[str]:
    return ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]


def apt_install(packages: Sequence[str]) -> None:
    """Install missing Debian packages without letting their scripts start system daemons.

    docker.io and containerd would start their own servers from their maintainer scripts;
    cake-cluster starts them itself, so a policy-rc.d that answers 101 ("not allowed")
    holds them back for the duration of the install.
    """
    missing = missing_packages(packages)
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise ClusterError(f"missing Debian packages {' '.join(missing)} and no apt-get")
    env = daemon_env({"DEBIAN_FRONTEND": "noninteractive"})
    run(["apt-get", "update", "-qq"], env=env, timeout=900)
    policy = Path("/usr/sbin/policy-rc.d")
    created = not policy.exists()
    if created:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        run(apt_install_command(missing), env=env, timeout=1800)
    finally:
        if created:
            policy.unlink(missing_ok=True)
    still = missing_packages(missing)
    if still:
        raise ClusterError(f"apt-get did not install {' '.join(still)}")


# --- progress ------------------------------------------------------------------------------------


class Progress:
    """One line per step: its name, what it did, and how long it took."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.started = time.monotonic()

    @contextmanager
    def step(self, name: str) -> Iterator[StepNote]:
        note = StepNote()
        began = time.monotonic()
        try:
            yield note
        except ClusterError as exc:
            raise ClusterError(f"{name}: {exc}") from exc
        elapsed = time.monotonic() - began
        print(f"{name:<24}{note.text or 'done'} ({elapsed:.1f}s)", flush=True)

    def total(self) -> float:
        return time.monotonic() - self.started


class StepNote:
    """What a step reports on its progress line."""

    def __init__(self) -> None:
        self.text = ""

    def __call__(self, text: str) -> None:
        self.text = text
