"""The orchestrator: components of one profile in dependency order."""

from __future__ import annotations

import contextlib
import fcntl
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from functools import cached_property
from pathlib import Path

from cake_devtools.stack.component import (
    Component,
    ComponentStatus,
    StackContext,
    State,
)
from cake_devtools.stack.envoy import EnvoyComponent
from cake_devtools.stack.errors import StackError
from cake_devtools.stack.kafka import KafkaComponent
from cake_devtools.stack.layout import RunLayout, repo_root
from cake_devtools.stack.postgres import PostgresComponent
from cake_devtools.stack.process import group_members
from cake_devtools.stack.redis import RedisComponent
from cake_devtools.stack.services import (
    BANK,
    SERVICES,
    Endpoints,
    ServiceComponent,
    build_service_environment,
)
from cake_devtools.stack.settings import load_settings
from cake_devtools.stack.smtp_sink import SmtpSinkComponent

#: Start order; ``down`` goes the other way.
COMPONENTS = (
    "postgres",
    "redis",
    "kafka",
    "smtp-sink",
    "auth",
    "payments",
    "promotions",
    "notifications",
    "events",
    "envoy",
)
NAME_WIDTH = max(map(len, COMPONENTS)) + 1
"""The column a component's name fills in the stack's output (the longest name and a space)."""


def _silent(_: str) -> None:
    pass


class Stack:
    """The local stack of one profile (``dev`` for ``make up``, ``test`` for the test session).

    Every method is idempotent: ``up`` leaves healthy components alone and ``down`` ignores
    stopped ones, so callers never need to check first.
    """

    def __init__(self, profile: str = "dev", *, echo: Callable[[str], None] | None = print) -> None:
        self.profile = profile
        self._ctx = StackContext(
            profile=profile,
            settings=load_settings(profile),
            layout=RunLayout(repo_root(), profile),
            echo=echo or _silent,
        )

    # -- components ------------------------------------------------------------------------

    @cached_property
    def _postgres(self) -> PostgresComponent:
        return PostgresComponent(self._ctx)

    @cached_property
    def _redis(self) -> RedisComponent:
        return RedisComponent(self._ctx)

    @cached_property
    def _kafka(self) -> KafkaComponent:
        return KafkaComponent(self._ctx)

    @cached_property
    def _smtp_sink(self) -> SmtpSinkComponent:
        return SmtpSinkComponent(self._ctx)

    @property
    def mail_dir(self) -> Path:
        """Where the SMTP sink stores the e-mails it received (one ``.eml`` file each)."""
        return self._smtp_sink.mail_dir

    @cached_property
    def _components(self) -> dict[str, Component]:
        components: dict[str, Component] = {
            "postgres": self._postgres,
            "redis": self._redis,
            "kafka": self._kafka,
            "smtp-sink": self._smtp_sink,
        }
        endpoints = self._endpoints()
        for spec in (BANK, *SERVICES):
            components[spec.name] = ServiceComponent(self._ctx, spec, endpoints)
        events = components["events"]
        assert isinstance(events, ServiceComponent)
        components["envoy"] = EnvoyComponent(self._ctx, events_running=events.alive)
        return components

    def _endpoints(self) -> Endpoints:
        settings = self._ctx.settings
        pg_host, pg_port = self._postgres.host_port()
        return Endpoints(
            postgres_host=pg_host,
            postgres_port=pg_port,
            redis_url=self._redis.url,
            kafka_bootstrap=self._kafka.bootstrap,
            grpc_ports={
                "auth": settings.auth_grpc_port,
                "promotions": settings.promotions_grpc_port,
                "events": settings.events_grpc_port,
                "notifications": settings.notifications_grpc_port,
                BANK.name: settings.payments_grpc_port,
            },
            jwt_signing_key=self._ctx.layout.jwt_signing_key,
            jwks_file=self._ctx.layout.jwks_file,
            metrics_ports={
                "auth": settings.auth_metrics_port,
                "promotions": settings.promotions_metrics_port,
                "events": settings.events_metrics_port,
                "notifications": settings.notifications_metrics_port,
                BANK.name: settings.payments_metrics_port,
            },
            otlp_endpoint=settings.otlp_endpoint,
            smtp_port=settings.smtp_sink_port,
            notifications_secret_file=self._ctx.layout.keys / "notifications-client-secret",
            public_url=f"http://127.0.0.1:{settings.gateway_port}",
            auth_workers=settings.auth_workers,
            socket_dir=self._ctx.layout.sockets,
        )

    def _select(self, components: Iterable[str] | None) -> list[Component]:
        if components is None:
            return [self._components[name] for name in COMPONENTS]
        wanted = set(components)
        unknown = wanted.difference(COMPONENTS)
        if unknown:
            raise StackError(
                f"unknown component(s) {', '.join(sorted(unknown))}; "
                f"expected some of {', '.join(COMPONENTS)}"
            )
        return [self._components[name] for name in COMPONENTS if name in wanted]

    # -- lifecycle -------------------------------------------------------------------------

    def up(self, components: Iterable[str] | None = None) -> None:
        """Start ``components`` (all when None) in dependency order and wait until each serves.

        With ``None`` a component that cannot run in this checkout yet (a service without its
        code, the gateway without a descriptor set) is skipped with a warning; named
        components must start.
        """
        strict = components is not None
        selected = self._select(components)
        with self._exclusive():
            self._up(selected, strict=strict)

    def _up(self, selected: list[Component], *, strict: bool) -> None:
        began = time.monotonic()
        skipped: list[str] = []
        started: list[str] = []
        for component in selected:
            reason = component.unavailable_reason()
            if reason is not None:
                if strict:
                    raise StackError(f"{component.name}: cannot start: {reason}")
                self._echo(component.name, f"SKIPPED: {reason}")
                skipped.append(component.name)
                continue
            if self._up_one(component):
                started.append(component.name)
        # A gateway started by this call health-checked the services once they were ready;
        # one that was already running learns of (re)started services only at its next check.
        gateway_upstreams = {spec.name for spec in SERVICES}
        restarted_services = [name for name in started if name in gateway_upstreams]
        if restarted_services and "envoy" not in started:
            self.wait_gateway_routing(restarted_services)
        summary = f"stack '{self.profile}' up in {time.monotonic() - began:.1f}s"
        if skipped:
            summary += f" (skipped: {', '.join(skipped)})"
        self._ctx.echo(summary)
        if "envoy" in (component.name for component in selected) and "envoy" not in skipped:
            self._ctx.echo(f"gateway: {self.gateway_url}")
        self._ctx.echo(f"logs:    {self._relative(self._ctx.layout.logs)}/")

    def _up_one(self, component: Component) -> bool:
        """Bring ``component`` up; True if it had to be (re)started."""
        began = time.monotonic()
        started = True
        current = component.status()
        if current.state is State.EXTERNAL:
            self._echo(component.name, f"external at {current.address}, checking")
            started = False
        elif current.state is State.RUNNING and (reason := component.restart_reason()):
            self._echo(component.name, f"restarting (pid {current.pid}): {reason}")
            component.stop()
            component.start()
        elif current.state is State.RUNNING:
            self._echo(component.name, f"already running (pid {current.pid}), checking")
            started = False
        else:
            log = self._relative(component.log_path)
            self._echo(component.name, f"starting (log: {log})")
            component.start()
        component.wait_ready(began + self._ctx.settings.startup_timeout_seconds)
        address = component.status().address
        self._echo(component.name, f"ready at {address} ({time.monotonic() - began:.1f}s)")
        return started

    def gateway_health_flags(self) -> dict[str, str]:
        """Envoy's health flags per cluster (``healthy``, or e.g. ``/failed_active_hc``);
        empty when the gateway does not answer."""
        envoy = self._components["envoy"]
        assert isinstance(envoy, EnvoyComponent)
        return envoy.health_flags() or {}

    def wait_gateway_routing(self, services: Iterable[str] | None = None) -> None:
        """If the gateway runs, wait until it health-checked ``services`` (all when None)
        successfully since this call and routes to them: after a service restart or a
        dependency outage, a service is ready a little before the gateway sends it requests."""
        envoy = self._components["envoy"]
        assert isinstance(envoy, EnvoyComponent)
        if envoy.status().state is not State.RUNNING:
            return
        names = [spec.name for spec in SERVICES] if services is None else list(services)
        began = time.monotonic()
        deadline = began + self._ctx.settings.startup_timeout_seconds
        envoy.wait_routing(names, deadline)
        for spec in SERVICES:
            if spec.name in names and spec.gateway_probe is not None:
                self._wait_routed(f"{self.gateway_url}{spec.gateway_probe}", deadline)
        waited = time.monotonic() - began
        self._echo("envoy", f"routes to {', '.join(names)} ({waited:.1f}s)")

    @staticmethod
    def _wait_routed(url: str, deadline: float) -> None:
        import httpx

        answer: object = "no answer"
        while True:
            try:
                response = httpx.get(url, timeout=2)
                if response.status_code == 200:
                    return
                answer = f"{response.status_code} {response.text[:120]}"
            except httpx.HTTPError as error:
                answer = repr(error)
            if time.monotonic() > deadline:
                raise StackError(f"envoy: GET {url} does not reach its service yet: {answer}")
            time.sleep(0.1)

    def down(self, components: Iterable[str] | None = None) -> None:
        """Stop ``components`` (all when None) in reverse dependency order; data is kept."""
        selected = self._select(components)
        with self._exclusive():
            for component in reversed(selected):
                current = component.status()
                if current.state is State.RUNNING:
                    self._echo(component.name, f"stopping (pid {current.pid})")
                    component.stop()
                    self._echo(component.name, "stopped")

    def restart(self, components: Iterable[str] | None = None) -> None:
        """Stop ``components`` (all when None) that run, then bring them up again as ``up``
        does (dependency order, each waited for, the gateway's routing too)."""
        selected = self._select(components)
        with self._exclusive():
            for component in reversed(selected):
                current = component.status()
                if current.state is State.RUNNING:
                    self._echo(component.name, f"stopping (pid {current.pid})")
                    component.stop()
            self._up(selected, strict=components is not None)

    def log_paths(self, components: Iterable[str] | None = None) -> dict[str, Path]:
        """Each selected component's log file (all when None), whether or not it exists yet."""
        return {component.name: component.log_path for component in self._select(components)}

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One ``up``/``down`` per profile at a time (parallel test workers, two terminals):
        without it both would see a component stopped and start it twice."""
        self._ctx.layout.make_dirs()
        with (self._ctx.layout.root / "stack.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def status(self) -> dict[str, ComponentStatus]:
        return {name: self._components[name].status() for name in COMPONENTS}

    def start(self, component: str) -> None:
        self.up([component])

    def stop(self, component: str) -> None:
        self.down([component])

    def processes(self) -> dict[str, list[int]]:
        """The live processes of every running component this stack started, by component
        (a service running several workers lists its supervisor and every worker)."""
        return {
            name: group_members(status.pid)
            for name, status in self.status().items()
            if status.pid is not None
        }

    def kill(self, component: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a component's processes and return (fault tests)."""
        (selected,) = self._select([component])
        selected.kill(sig)

    # -- where things are ------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        return self._ctx.layout.root

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self._ctx.settings.gateway_port}"

    @property
    def postgres_admin_url(self) -> str:
        """Superuser libpq URL (contains a password: do not print it)."""
        return self._postgres.admin_url

    @property
    def redis_url(self) -> str:
        return self._redis.url

    @property
    def kafka_bootstrap(self) -> str:
        return self._kafka.bootstrap

    def service_environment(self) -> dict[str, dict[str, str]]:
        """Environment variables per service (``auth``, ``promotions``, ``events``,
        ``payments``)."""
        return build_service_environment(self._endpoints(), self._ctx.passwords)

    # -- output ----------------------------------------------------------------------------

    def _echo(self, name: str, message: str) -> None:
        self._ctx.echo(f"{name:<{NAME_WIDTH}}{message}")

    def _relative(self, path: Path) -> str:
        try:
            return str(path.relative_to(self._ctx.layout.repo))
        except ValueError:
            return str(path)


def service_environment(profile: str = "dev") -> dict[str, dict[str, str]]:
    """Environment variables per service for ``profile`` (what ``up`` starts them with)."""
    return Stack(profile, echo=None).service_environment()
