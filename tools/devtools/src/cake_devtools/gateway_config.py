"""Renders the Envoy gateway config from ``gateway/envoy.yaml.j2``.

This module and the template are the single source of truth for the gateway config: the local
stack renders it with loopback upstreams, and the Kubernetes variant renders the same template
with service DNS names and mounted files. Everything that differs between the two lives in
:class:`GatewayContext`; everything that follows from the contracts (routes, public methods,
wrapped responses, accepted JSON fields) is derived from the generated descriptors by
:func:`rest_methods`, so a new RPC with a ``google.api.http`` rule is routed without editing
the template.
"""

from __future__ import annotations

import importlib
import importlib.util
import ipaddress
import json
import pkgutil
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import jinja2
import yaml
from cake.access.v1 import access_pb2
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, descriptor_pool

TEMPLATE_NAME = "envoy.yaml.j2"

AUTH_SERVICE = "cake.auth.v1.AuthService"
PROMOTIONS_SERVICE = "cake.promotions.v1.PromotionsService"
NOTIFICATIONS_SERVICE = "cake.notifications.v1.NotificationsService"
HEALTH_SERVICE = "cake.events.v1.SystemHealthService"
EVENT_ADMIN_SERVICE = "cake.events.v1.EventAdminService"
#: The services whose ``google.api.http`` rules the gateway serves as REST.
TRANSCODED_SERVICES: tuple[str, ...] = (
    AUTH_SERVICE,
    PROMOTIONS_SERVICE,
    NOTIFICATIONS_SERVICE,
    HEALTH_SERVICE,
    EVENT_ADMIN_SERVICE,
)

#: The RPC that serves ``GET /health`` (mapped by its ``google.api.http`` option).
HEALTH_METHOD = "GetSystemHealth"
HEALTH_REST_PATH = "/health"
OPENAPI_REST_PATH = "/openapi.json"
#: Where auth's keys are published (AuthService.GetJwks); Envoy's jwt_authn fetches them here.
JWKS_REST_PATH = "/.well-known/jwks.json"
#: The API reference page (Swagger UI rendering ``/openapi.json``); its files live under it.
DOCS_REST_PATH = "/docs"
#: The reference page's own Content-Security-Policy (every other answer keeps the API's
#: ``default-src 'none'``): scripts and styles from the gateway itself only, no inline script,
#: nothing from another origin. Swagger UI draws its icons as ``data:`` SVGs and fetches the
#: document from the same origin; ``style-src`` allows inline styles because its syntax
#: highlighter writes ``style`` attributes.
DOCS_CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'"
)

# Which methods are callable without a token (``public``) or with an optional one
# (``token_optional``) is declared in the contracts (``option (cake.access.v1.access)``) and
# read from the descriptors; everything else needs a valid bearer token at the edge, and the
# services check the roles and scopes each method allows.
#: Methods that answer 201 Created over REST on success, as the Cake System does.
CREATED_METHODS: frozenset[str] = frozenset(
    {f"{AUTH_SERVICE}/Register", f"{PROMOTIONS_SERVICE}/CreateCampaign"}
)
#: The OAuth 2.0 token endpoint (``POST /oauth/token``): its REST answers follow RFC 6749
#: (``Cache-Control: no-store``; errors as ``{"error", "error_description"}``).
OAUTH_TOKEN_METHOD = f"{AUTH_SERVICE}/Token"
#: Methods that also draw from the stricter per-IP bucket (credential guessing, sign-up spam).
AUTH_THROTTLED_METHODS: tuple[str, ...] = (
    f"{AUTH_SERVICE}/Register",
    f"{AUTH_SERVICE}/Login",
    OAUTH_TOKEN_METHOD,
)

#: Request headers the gateway sets for the services. Any incoming header with this prefix is
#: dropped before the first filter runs, so a client can never supply (forge) one.
GATEWAY_HEADER_PREFIX = "x-cake-"
CLIENT_IP_HEADER = "x-cake-client-ip"
#: base64url of the verified token's JSON claims (set only when the edge verified a token).
JWT_PAYLOAD_HEADER = "x-cake-jwt-payload"
USER_ID_HEADER = "x-cake-user-id"
USER_ROLE_HEADER = "x-cake-user-role"

#: Envoy's own replies carry a google.rpc.Status-shaped body like the services' errors, so the
#: code is the gRPC code that matches the HTTP status (the inverse of grpc-gateway's mapping).
#: Statuses not listed get UNKNOWN (2).
LOCAL_REPLY_GRPC_CODES: tuple[tuple[int, int], ...] = (
    (400, 3),  # INVALID_ARGUMENT
    (401, 16),  # UNAUTHENTICATED
    (403, 7),  # PERMISSION_DENIED
    (404, 5),  # NOT_FOUND
    (405, 12),  # UNIMPLEMENTED (method not allowed)
    (408, 4),  # DEADLINE_EXCEEDED (request timeout)
    (413, 8),  # RESOURCE_EXHAUSTED (body too large)
    (429, 8),  # RESOURCE_EXHAUSTED (rate limited)
    (431, 8),  # RESOURCE_EXHAUSTED (headers too large)
    (500, 13),  # INTERNAL
    (501, 12),  # UNIMPLEMENTED
    (502, 14),  # UNAVAILABLE
    (503, 14),  # UNAVAILABLE
    (504, 4),  # DEADLINE_EXCEEDED
)

#: Messages of Envoy's own replies to REST clients where its text says too little.
LOCAL_REPLY_MESSAGES: dict[int, str] = {
    # Envoy's "no route" reply has no text; say what was not found, like Cake does.
    404: "Cannot %REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    429: "Too Many Requests",
}

MEBIBYTE = 1024 * 1024

#: Paths the trailing-slash normaliser has nothing to do for (RE2, the whole ``:path``): the
#: part before ``?`` or ``#`` ends in a character other than a slash, or is ``/`` itself.
#: The gateway skips its Lua script for them (see the template).
PATH_WITHOUT_TRAILING_SLASH_REGEX = r"^(/|[^?#]*[^/?#])([?#].*)?$"


class GatewayConfigError(RuntimeError):
    """The gateway config cannot be rendered (missing descriptor set, unknown RPC, ...)."""


# -- the REST surface, derived from the contracts --------------------------------------------


@dataclass(frozen=True)
class RestMethod:
    """One RPC with its ``google.api.http`` binding, as the gateway serves it."""

    service: str
    method: str
    http_method: str
    path: str
    #: ``*`` (the whole request message is the JSON body), a field name, or empty (no body).
    body: str
    #: The response field the contract returns as the bare HTTP body (empty: whole message).
    response_body: str
    request_type: str
    response_type: str
    path_params: tuple[str, ...]
    #: Top-level JSON keys a body may carry: the JSON and proto names of the body fields.
    body_keys: tuple[str, ...]
    #: Callable without a token (the contract's ``cake.access.v1.access`` option).
    public: bool = False
    #: A token is optional, verified when present (the refresh token may be in the body).
    optional_token: bool = False
    #: The body is a raw ``google.api.HttpBody`` field (any content type, e.g. a form).
    raw_body: bool = False

    @property
    def full_name(self) -> str:
        return f"{self.service}/{self.method}"

    @property
    def grpc_path(self) -> str:
        return f"/{self.full_name}"

    @property
    def oauth(self) -> bool:
        return self.full_name == OAUTH_TOKEN_METHOD

    @property
    def success_status(self) -> int:
        return 201 if self.full_name in CREATED_METHODS else 200

    @property
    def idempotent(self) -> bool:
        """Safe to retry on a connection failure: the reads."""
        return self.http_method == "GET"

    @property
    def is_health(self) -> bool:
        return self.service == HEALTH_SERVICE and self.method == HEALTH_METHOD

    @property
    def lua_path_pattern(self) -> str:
        """The REST path as an anchored Lua pattern (``{var}`` matches one segment)."""
        pieces = re.split(r"(\{[^}]+\})", self.path)
        out = []
        for piece in pieces:
            if piece.startswith("{"):
                out.append("[^/]+")
            else:
                out.append(re.sub(r"([\^$()%.\[\]*+\-?])", r"%\1", piece))
        return "^" + "".join(out) + "$"


@dataclass(frozen=True)
class DocsFile:
    """One file of the API reference page, served by Envoy itself from ``filename``."""

    path: str
    filename: Path
    content_type: str


def docs_files(pages_dir: Path, swagger_ui_dir: Path) -> tuple[DocsFile, ...]:
    """The page (``gateway/docs``: our HTML and initializer) and the Swagger UI files it loads.

    Every file is a separate exact route (Envoy reads each into memory at start-up), so
    nothing else under ``/docs/`` can be asked for.
    """
    return (
        DocsFile(DOCS_REST_PATH, pages_dir / "index.html", "text/html; charset=utf-8"),
        DocsFile(
            f"{DOCS_REST_PATH}/swagger-initializer.js",
            pages_dir / "swagger-initializer.js",
            "text/javascript; charset=utf-8",
        ),
        DocsFile(
            f"{DOCS_REST_PATH}/swagger-ui-bundle.js",
            swagger_ui_dir / "swagger-ui-bundle.js",
            "text/javascript; charset=utf-8",
        ),
        DocsFile(
            f"{DOCS_REST_PATH}/swagger-ui.css",
            swagger_ui_dir / "swagger-ui.css",
            "text/css; charset=utf-8",
        ),
        DocsFile(
            f"{DOCS_REST_PATH}/favicon-32x32.png",
            swagger_ui_dir / "favicon-32x32.png",
            "image/png",
        ),
    )


def json_name(proto_name: str) -> str:
    """protoc's default JSON name: ``latest_login`` -> ``latestLogin``."""
    head, *rest = proto_name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _binding_pattern(rule: http_pb2.HttpRule) -> tuple[str, str] | None:
    kind = rule.WhichOneof("pattern")
    if kind is None:
        return None
    if kind == "custom":
        return rule.custom.kind.upper(), rule.custom.path
    return kind.upper(), str(getattr(rule, kind))


def rest_methods(
    file_set: descriptor_pb2.FileDescriptorSet, services: Sequence[str]
) -> tuple[RestMethod, ...]:
    """Every HTTP binding of ``services`` in ``file_set``, in declaration order."""
    messages: dict[str, descriptor_pb2.DescriptorProto] = {}
    found: dict[str, descriptor_pb2.ServiceDescriptorProto] = {}
    for file in file_set.file:
        prefix = f"{file.package}." if file.package else ""
        for message in file.message_type:
            messages[prefix + message.name] = message
        for service in file.service:
            found[prefix + service.name] = service
    methods: list[RestMethod] = []
    for service_name in services:
        if service_name not in found:
            raise GatewayConfigError(f"the contracts have no service {service_name}")
        for method in found[service_name].method:
            if not method.options.HasExtension(annotations_pb2.http):
                continue
            rule = method.options.Extensions[annotations_pb2.http]
            access = method.options.Extensions[access_pb2.access]
            request_type = method.input_type.lstrip(".")
            request = messages[request_type]
            for binding in (rule, *rule.additional_bindings):
                pattern = _binding_pattern(binding)
                if pattern is None:
                    continue
                http_method, path = pattern
                path_params = tuple(name.split("=")[0] for name in re.findall(r"\{([^}]+)\}", path))
                body_keys: tuple[str, ...] = ()
                raw_body = any(
                    f.name == binding.body and f.type_name == ".google.api.HttpBody"
                    for f in request.field
                )
                if binding.body == "*":
                    body_fields = [f for f in request.field if f.name not in path_params]
                    body_keys = tuple(
                        sorted(
                            {f.name for f in body_fields}
                            | {f.json_name or json_name(f.name) for f in body_fields}
                        )
                    )
                methods.append(
                    RestMethod(
                        service=service_name,
                        method=method.name,
                        http_method=http_method,
                        path=path,
                        body=binding.body,
                        response_body=binding.response_body,
                        request_type=request_type,
                        response_type=method.output_type.lstrip("."),
                        path_params=path_params,
                        body_keys=body_keys,
                        public=access.public,
                        optional_token=access.token_optional,
                        raw_body=raw_body,
                    )
                )
    return tuple(methods)


def contract_file_set(
    services: Iterable[str] = TRANSCODED_SERVICES,
) -> descriptor_pb2.FileDescriptorSet:
    """The contracts as the generated Python modules describe them.

    The Envoy descriptor set has its ``response_body`` options removed (see
    ``cake_devtools.codegen.envoy_descriptor_set``); the Python descriptors keep them, so the
    gateway knows which responses to unwrap. Both come from the same ``cake-codegen`` run.
    """
    import cake

    for module in pkgutil.walk_packages(cake.__path__, "cake."):
        if module.name.endswith("_pb2"):
            importlib.import_module(module.name)
    pool = descriptor_pool.Default()
    file_set = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()
    pending = []
    for name in services:
        try:
            pending.append(pool.FindServiceByName(name).file)
        except KeyError:
            raise GatewayConfigError(
                f"the generated Python code has no service {name}; run `uv run cake-codegen`"
            ) from None
    while pending:
        file = pending.pop()
        if file.name in seen:
            continue
        seen.add(file.name)
        file.CopyToProto(file_set.file.add())
        pending.extend(file.dependencies)
    return file_set


def default_docs_pages_dir() -> Path:
    return gateway_dir() / "docs"


def default_swagger_ui_dir() -> Path:
    """Swagger UI's files in the installed ``swagger-ui-py`` wheel (found without importing
    it: its package imports web-framework adapters the gateway has no use for)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise GatewayConfigError("swagger-ui-py is not installed; run `uv sync --frozen`")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


# -- the render context -----------------------------------------------------------------------


@dataclass(frozen=True)
class Upstream:
    """One gRPC service behind the gateway."""

    name: str
    host: str
    port: int
    #: gRPC paths routed to this upstream, e.g. ``/cake.auth.`` (covers every version).
    grpc_path_prefix: str
    #: Unix sockets of a service that runs several worker processes (cake_common.workers):
    #: each is an endpoint of its own, balanced per request and health-checked on its own,
    #: and they replace ``host:port``.
    sockets: tuple[str, ...] = ()

    @property
    def discovery_type(self) -> Literal["STATIC", "STRICT_DNS"]:
        if self.sockets:
            return "STATIC"
        # STATIC only accepts IP literals; DNS names (Kubernetes services) need STRICT_DNS.
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return "STRICT_DNS"
        return "STATIC"

    def serves(self, method: RestMethod) -> bool:
        return method.grpc_path.startswith(self.grpc_path_prefix)


@dataclass(frozen=True)
class JwksSource:
    """Where jwt_authn fetches the JWKS (``remote_jwks``) over plain HTTP. By default the
    gateway's own listener on loopback: it routes ``GET /.well-known/jwks.json`` to auth's
    ``GetJwks`` (auth speaks only gRPC), so a rotated key reaches Envoy within
    ``cache_seconds`` without a restart or a mounted file."""

    host: str = "127.0.0.1"
    #: ``None``: the gateway's own listen port.
    port: int | None = None
    path: str = JWKS_REST_PATH


@dataclass(frozen=True)
class GatewayContext:
    """Everything the template needs; the local stack and k8s differ only here."""

    listen_address: str
    listen_port: int
    admin_address: str
    admin_port: int
    descriptor_path: Path
    upstreams: Sequence[Upstream]
    #: ``gateway/generated/openapi.json`` (``cake-codegen``), served at ``GET /openapi.json``.
    openapi_path: Path
    #: ``gateway/docs``: the reference page's HTML and the script that starts Swagger UI.
    docs_pages_dir: Path = field(default_factory=default_docs_pages_dir)
    #: Swagger UI's distribution files (the ``swagger-ui-py`` wheel locally, pinned in uv.lock;
    #: ``gateway/docs/swagger-ui`` in the gateway image).
    swagger_ui_dir: Path = field(default_factory=default_swagger_ui_dir)
    #: A listener on ``listen_address`` that passes only GET /ready and GET /stats/prometheus
    #: on to the admin interface (k8s: probes and Prometheus; the admin port stays on loopback).
    ops_port: int | None = None
    #: Where Envoy fetches the auth service's JWKS (default: through its own listener).
    jwks: JwksSource = field(default_factory=JwksSource)
    #: How long a fetched JWKS is used before Envoy fetches it again in the background: the
    #: longest a newly published key can be refused at the edge.
    jwks_cache_seconds: int = 300
    jwt_issuer: str = "cake-system"
    jwt_audiences: Sequence[str] = ("cake-users",)
    #: Requests per minute per client IP over every route (Cake's documented limit).
    rate_limit_per_minute: int = 100
    #: Requests per minute per client IP to register and login together (on top of the above).
    auth_rate_limit_per_minute: int = 20
    #: Client IPs tracked at once per bucket; the least recently seen one is forgotten first.
    rate_limit_tracked_clients: int = 10_000
    cors_allowed_origins: Sequence[str] = ("*",)
    max_request_bytes: int = MEBIBYTE
    #: Downstream connections open at once over all listeners (overload manager).
    max_downstream_connections: int = 10_000
    #: Proxies in front of the gateway whose X-Forwarded-For entry is trusted (0: the
    #: connection's peer is the client).
    xff_num_trusted_hops: int = 0
    health_cluster: str = "events"
    health_timeout: str = "5s"
    upstream_timeout: str = "15s"
    request_timeout: str = "30s"
    request_headers_timeout: str = "10s"
    stream_idle_timeout: str = "30s"
    connection_idle_timeout: str = "300s"
    transcoded_services: Sequence[str] = field(default=TRANSCODED_SERVICES)
    local_reply_grpc_codes: Sequence[tuple[int, int]] = LOCAL_REPLY_GRPC_CODES

    @property
    def docs_files(self) -> tuple[DocsFile, ...]:
        return docs_files(self.docs_pages_dir, self.swagger_ui_dir)

    @property
    def jwks_port(self) -> int:
        return self.jwks.port if self.jwks.port is not None else self.listen_port

    @property
    def jwks_uri(self) -> str:
        return f"http://{self.jwks.host}:{self.jwks_port}{self.jwks.path}"

    def upstream_for(self, method: RestMethod) -> Upstream:
        for upstream in self.upstreams:
            if upstream.serves(method):
                return upstream
        raise GatewayConfigError(f"no upstream serves {method.grpc_path}")

    @property
    def auth_throttled_path_regex(self) -> str:
        """The login/register paths, REST and gRPC (the limit runs before transcoding)."""
        return _paths_regex(AUTH_THROTTLED_METHODS, self.rest_paths_of(AUTH_THROTTLED_METHODS))

    def rest_paths_of(self, full_names: Iterable[str]) -> list[str]:
        wanted = set(full_names)
        return [m.path for m in self.methods() if m.full_name in wanted]

    def methods(self) -> tuple[RestMethod, ...]:
        return rest_api(tuple(self.transcoded_services))


_rest_api_cache: dict[tuple[str, ...], tuple[RestMethod, ...]] = {}


def rest_api(services: Sequence[str] = TRANSCODED_SERVICES) -> tuple[RestMethod, ...]:
    """The REST methods the gateway serves for ``services``, from the generated code."""
    key = tuple(services)
    if key not in _rest_api_cache:
        _rest_api_cache[key] = rest_methods(contract_file_set(key), key)
    return _rest_api_cache[key]


def _paths_regex(full_names: Iterable[str], rest_paths: Iterable[str]) -> str:
    alternatives = [re.escape(f"/{name}") for name in full_names]
    alternatives += [re.escape(path) for path in rest_paths]
    return rf"^({'|'.join(alternatives)})(\?.*)?$"


def local_upstreams(
    *,
    auth_port: int,
    promotions_port: int,
    events_port: int,
    notifications_port: int,
    host: str = "127.0.0.1",
    auth_sockets: Sequence[Path] = (),
) -> tuple[Upstream, ...]:
    """The services on one host (the local stack); auth on its workers' sockets when it
    runs several worker processes."""
    return (
        Upstream("auth", host, auth_port, "/cake.auth.", tuple(str(s) for s in auth_sockets)),
        Upstream("promotions", host, promotions_port, "/cake.promotions."),
        Upstream("notifications", host, notifications_port, "/cake.notifications."),
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


def default_openapi_path() -> Path:
    return gateway_dir() / "generated" / "openapi.json"


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
    for method in rest_api(services):
        if method.method not in methods[method.service]:
            raise GatewayConfigError(
                f"{path} lacks {method.full_name} that the generated code has; run cake-codegen"
            )


def check_files(ctx: GatewayContext) -> None:
    """The files Envoy loads at start-up exist (its own error would be a startup crash)."""
    check_descriptor(ctx.descriptor_path, ctx.transcoded_services)
    if not ctx.openapi_path.is_file():
        raise GatewayConfigError(f"{ctx.openapi_path} does not exist; run `uv run cake-codegen`")
    for docs_file in ctx.docs_files:
        if not docs_file.filename.is_file():
            raise GatewayConfigError(
                f"{docs_file.filename} (served at {docs_file.path}) does not exist; "
                "run `uv sync --frozen`"
            )


def _yaml_quote(value: object) -> str:
    # A JSON string is a valid YAML double-quoted scalar; jinja's tojson would HTML-escape.
    return json.dumps(str(value))


def _is_ip(value: object) -> bool:
    try:
        ipaddress.ip_address(str(value))
    except ValueError:
        return False
    return True


def _lua_quote(value: object) -> str:
    # Lua accepts the same escapes as JSON for what we emit (ASCII names and patterns).
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
    environment.filters["lua_quote"] = _lua_quote
    environment.tests["is_ip"] = _is_ip
    methods = ctx.methods()
    text = environment.get_template(TEMPLATE_NAME).render(
        ctx=ctx,
        methods=methods,
        body_methods=[m for m in methods if m.body == "*"],
        public_methods=[m for m in methods if m.public],
        optional_token_methods=[m for m in methods if m.optional_token],
        health_method=next(m for m in methods if m.is_health),
        openapi_rest_path=OPENAPI_REST_PATH,
        docs_files=ctx.docs_files,
        docs_content_security_policy=DOCS_CONTENT_SECURITY_POLICY,
        local_reply_messages=LOCAL_REPLY_MESSAGES,
        gateway_header_prefix=GATEWAY_HEADER_PREFIX,
        path_without_trailing_slash_regex=PATH_WITHOUT_TRAILING_SLASH_REGEX,
        client_ip_header=CLIENT_IP_HEADER,
        jwt_payload_header=JWT_PAYLOAD_HEADER,
        user_id_header=USER_ID_HEADER,
        user_role_header=USER_ROLE_HEADER,
    )
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
