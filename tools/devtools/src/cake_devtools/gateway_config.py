"""Renders the Envoy gateway config from ``gateway/envoy.yaml.j2``.

This module is the single source of truth for the gateway config: the local stack renders it
with loopback upstreams, and the Kubernetes variant renders the same template with service DNS
names. Everything that differs between the two lives in :class:`GatewayContext`.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import jinja2
import yaml
from google.protobuf import descriptor_pb2

TEMPLATE_NAME = "envoy.yaml.j2"

#: The RPC that serves ``GET /health`` (mapped by its ``google.api.http`` option).
HEALTH_SERVICE = "cake.events.v1.SystemHealthService"
HEALTH_METHOD = "GetSystemHealth"
HEALTH_REST_PATH = "/health"

#: Envoy's own replies carry a google.rpc.Status-shaped body like the services' errors, so the
#: code is the gRPC code that matches the HTTP status (the inverse of grpc-gateway's mapping).
#: Statuses not listed get UNKNOWN (2).
LOCAL_REPLY_GRPC_CODES: tuple[tuple[int, int], ...] = (
    (400, 3),  # INVALID_ARGUMENT
    (401, 16),  # UNAUTHENTICATED
    (403, 7),  # PERMISSION_DENIED
    (404, 5),  # NOT_FOUND
    (413, 8),  # RESOURCE_EXHAUSTED (body too large)
    (429, 8),  # RESOURCE_EXHAUSTED (rate limited)
    (500, 13),  # INTERNAL
    (501, 12),  # UNIMPLEMENTED
    (502, 14),  # UNAVAILABLE
    (503, 14),  # UNAVAILABLE
    (504, 4),  # DEADLINE_EXCEEDED
)


class GatewayConfigError(RuntimeError):
    """The gateway config cannot be rendered (missing descriptor set, unknown RPC, ...)."""


@dataclass(frozen=True)
class Upstream:
    """One gRPC service behind the gateway."""

    name: str
    host: str
    port: int
    #: gRPC paths routed to this upstream, e.g. ``/cake.auth.`` (covers every version).
    grpc_path_prefix: str

    @property
    def discovery_type(self) -> Literal["STATIC", "STRICT_DNS"]:
        # STATIC only accepts IP literals; DNS names (Kubernetes services) need STRICT_DNS.
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return "STRICT_DNS"
        return "STATIC"


@dataclass(frozen=True)
class GatewayContext:
    """Everything the template needs; the local stack and k8s differ only here."""

    listen_address: str
    listen_port: int
    admin_address: str
    admin_port: int
    descriptor_path: Path
    upstreams: Sequence[Upstream]
    health_cluster: str = "events"
    health_timeout: str = "5s"
    upstream_timeout: str = "15s"
    transcoded_services: Sequence[str] = field(default=(HEALTH_SERVICE,))
    local_reply_grpc_codes: Sequence[tuple[int, int]] = LOCAL_REPLY_GRPC_CODES

    @property
    def health_grpc_path(self) -> str:
        return f"/{HEALTH_SERVICE}/{HEALTH_METHOD}"

    @property
    def health_path_regex(self) -> str:
        # Local replies see the request after transcoding, so match the gRPC path of the
        # health RPC as well as the REST path (no route / rejected before transcoding).
        grpc_path = self.health_grpc_path.replace(".", r"\.")
        return rf"^({grpc_path}|{HEALTH_REST_PATH})(\?.*)?$"


def local_upstreams(
    *, auth_port: int, promotions_port: int, events_port: int, host: str = "127.0.0.1"
) -> tuple[Upstream, ...]:
    """The three services on one host (the local stack)."""
    return (
        Upstream("auth", host, auth_port, "/cake.auth."),
        Upstream("promotions", host, promotions_port, "/cake.promotions."),
        Upstream("events", host, events_port, "/cake.events."),
    )


def gateway_dir() -> Path:
    """``gateway/`` of the repository this package is installed from (editable install)."""
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "gateway" / TEMPLATE_NAME
        if candidate.is_file():
            return candidate.parent
    raise GatewayConfigError(f"cannot find gateway/{TEMPLATE_NAME} above {__file__}")


def default_descriptor_path() -> Path:
    return gateway_dir() / "generated" / "cake.pb"


def check_descriptor(path: Path, services: Sequence[str]) -> None:
    """Fail with a clear message unless the descriptor set serves what the config routes.

    Envoy's own error for a missing file or service is buried in its startup log; checking
    here makes ``cake-stack up`` and the tests say what to regenerate.
    """
    if not path.is_file():
        raise GatewayConfigError(
            f"descriptor set {path} does not exist; generate it first (cake-codegen)"
        )
    descriptor_set = descriptor_pb2.FileDescriptorSet()
    try:
        descriptor_set.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf raises its own DecodeError subclasses
        raise GatewayConfigError(f"{path} is not a FileDescriptorSet: {exc}") from exc
    methods: dict[str, set[str]] = {}
    for file in descriptor_set.file:
        for proto_service in file.service:
            name = proto_service.name
            full_name = f"{file.package}.{name}" if file.package else name
            methods[full_name] = {method.name for method in proto_service.method}
    for service in services:
        if service not in methods:
            raise GatewayConfigError(f"{path} has no service {service}; regenerate it")
    if HEALTH_SERVICE in services and HEALTH_METHOD not in methods[HEALTH_SERVICE]:
        raise GatewayConfigError(f"{path}: {HEALTH_SERVICE} has no {HEALTH_METHOD}")


def _yaml_quote(value: object) -> str:
    # A JSON string is a valid YAML double-quoted scalar; jinja's tojson would HTML-escape.
    return json.dumps(str(value))


def render_gateway_config(ctx: GatewayContext, *, template_dir: Path | None = None) -> str:
    """Render the Envoy config (YAML text) for ``ctx``; checks the descriptor set first."""
    check_descriptor(ctx.descriptor_path, ctx.transcoded_services)
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_dir or gateway_dir()),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 - YAML output, strings go through `quote`
    )
    environment.filters["quote"] = _yaml_quote
    text = environment.get_template(TEMPLATE_NAME).render(ctx=ctx)
    # Parse once so a template mistake fails here, not as an Envoy startup error.
    yaml.safe_load(text)
    return text


def write_gateway_config(ctx: GatewayContext, destination: Path) -> Path:
    """Render to ``destination`` (atomically, so a running Envoy never reads half a file)."""
    text = render_gateway_config(ctx)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_suffix(destination.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(destination)
    return destination
