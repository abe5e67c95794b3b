"""The gateway's edge behaviour against a real Envoy with fake services (no stack needed).

The fakes answer every method of the transcoded services through generic handlers, with
whatever a test sets, and record the metadata and request each call carried. Everything
asserted here is Envoy's doing (the config from ``gateway/envoy.yaml.j2``): transcoding of
every route, 201s, unwrapped bodies, untouched errors, no grpc-* headers, /health verdicts,
edge JWT checks on REST and native gRPC, headers forwarded and forgeries dropped, unknown
fields, body and path errors, retries of reads only, CORS and security headers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import pytest
from cake.auth.v1 import auth_pb2, auth_pb2_grpc
from cake.notifications.v1 import notifications_pb2  # noqa: F401  (its services in the pool)
from cake.promotions.v1 import promotions_pb2, promotions_pb2_grpc
from cake_devtools.gateway_config import (
    CLIENT_IP_HEADER,
    HEALTH_SERVICE,
    JWT_PAYLOAD_HEADER,
    USER_ID_HEADER,
    USER_ROLE_HEADER,
    GatewayContext,
    JwksSource,
    RestMethod,
    default_descriptor_path,
    default_openapi_path,
    local_upstreams,
    rest_api,
)
from cake_devtools.stack.envoy import run_gateway
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import descriptor_pool, json_format, message_factory
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

#: Starts a real Envoy: `make test` runs it, the quick `make test-unit` does not.
pytestmark = pytest.mark.slow

ISSUER = "cake-system"
AUDIENCE = "cake-users"
KID = "edge-test-key"
#: Unthrottled here: the rate limits are tested against the real services (tests/e2e).
UNLIMITED = 10_000_000
FAKE_CODE = "CAKE-ABCD1234"
FAKE_EVENT_ID = "0b7f6f0e-5a55-4c4e-9d43-2f4d6f1c9a10"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- fakes -------------------------------------------------------------------------------------


@dataclass
class Call:
    method: str
    metadata: dict[str, str]
    request: dict[str, Any]


@dataclass
class FakeError:
    code: int
    message: str
    details: list[Any] = field(default_factory=list)


Behaviour = Callable[[dict[str, Any]], "dict[str, Any] | FakeError"]


class FakeServices:
    """auth, promotions, events and notifications on their own ports, answering every
    transcoded method."""

    SERVICES = {
        "auth": ("cake.auth.v1.AuthService",),
        "promotions": ("cake.promotions.v1.PromotionsService",),
        "events": (HEALTH_SERVICE, "cake.events.v1.EventAdminService"),
        "notifications": ("cake.notifications.v1.NotificationsService",),
    }

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.behaviours: dict[str, Behaviour] = {}
        self.ports = {name: free_port() for name in self.SERVICES}
        self.health: dict[str, Any] = {}
        self._servers: list[grpc.Server] = []
        pool = descriptor_pool.Default()
        for name, services in self.SERVICES.items():
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
            for service_name in services:
                service = pool.FindServiceByName(service_name)
                handlers = {m.name: self._handler(m) for m in service.methods}
                server.add_generic_rpc_handlers(
                    (grpc.method_handlers_generic_handler(service_name, handlers),)
                )
            servicer = health.HealthServicer()
            servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
            self.health[name] = servicer
            server.add_insecure_port(f"127.0.0.1:{self.ports[name]}")
            self._servers.append(server)

    def _handler(self, method: Any) -> grpc.RpcMethodHandler[Any, Any]:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        full_name = f"{method.containing_service.full_name}/{method.name}"

        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            body = json_format.MessageToDict(request)
            metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
            self.calls.append(Call(full_name, metadata, body))
            behaviour = self.behaviours.get(full_name)
            answer = behaviour(body) if behaviour else {}
            if isinstance(answer, FakeError):
                status = status_pb2.Status(code=answer.code, message=answer.message)
                for detail in answer.details:
                    status.details.add().Pack(detail)
                context.abort_with_status(rpc_status.to_status(status))
            return json_format.ParseDict(answer, response_class())

        return grpc.unary_unary_rpc_method_handler(
            handle,
            request_deserializer=request_class.FromString,
            response_serializer=response_class.SerializeToString,
        )

    def start(self) -> None:
        for server in self._servers:
            server.start()

    def stop(self) -> None:
        for server in self._servers:
            server.stop(grace=None)

    def set_serving(self, name: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse
        self.health[name].set("", status.SERVING if serving else status.NOT_SERVING)

    def last_call(self, method: str) -> Call:
        for call in reversed(self.calls):
            if call.method == method:
                return call
        raise AssertionError(f"{method} was never called; calls: {[c.method for c in self.calls]}")


class Tokens:
    """An ES256 key published as a JWKS over HTTP (what auth's GetJwks is behind the real
    gateway; the fake auth here does not serve it), and tokens signed with it (or not quite)."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        public.update(kid=KID, use="sig", alg="ES256")
        document = json.dumps({"keys": [public]}).encode()

        class _Jwks(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(document)))
                self.end_headers()
                self.wfile.write(document)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Jwks)
        self.jwks = JwksSource(port=self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {
            "sub": "42",
            "role": "user",
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 3600,
            "jti": str(uuid.uuid4()),
            "sid": uuid.uuid4().hex,
        }
        claims.update(overrides)
        return claims

    def hs256_with_public_key(self) -> str:
        """The classic confusion attack: HMAC keyed with the published public key."""
        public_pem = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        signing_input = (
            f"{b64url({'alg': 'HS256', 'typ': 'JWT', 'kid': KID})}.{b64url(self.claims())}"
        )
        digest = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{base64.urlsafe_b64encode(digest).rstrip(b'=').decode()}"

    def sign(self, *, kid: str = KID, **overrides: Any) -> str:
        return jwt.encode(
            self.claims(**overrides), self.key, algorithm="ES256", headers={"kid": kid}
        )


def b64url(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fakes() -> Iterator[FakeServices]:
    services = FakeServices()
    services.start()
    yield services
    services.stop()


@pytest.fixture(scope="module")
def tokens() -> Iterator[Tokens]:
    served = Tokens()
    yield served
    served.close()


def edge_context(fakes: FakeServices, tokens: Tokens, **overrides: Any) -> GatewayContext:
    settings: dict[str, Any] = {
        "listen_address": "127.0.0.1",
        "listen_port": free_port(),
        "admin_address": "127.0.0.1",
        "admin_port": free_port(),
        "descriptor_path": default_descriptor_path(),
        "openapi_path": default_openapi_path(),
        "jwks": tokens.jwks,
        "upstreams": local_upstreams(
            auth_port=fakes.ports["auth"],
            promotions_port=fakes.ports["promotions"],
            events_port=fakes.ports["events"],
            notifications_port=fakes.ports["notifications"],
        ),
        "rate_limit_per_minute": UNLIMITED,
        "auth_rate_limit_per_minute": UNLIMITED,
        "cors_allowed_origins": ("https://app.cake.example",),
    }
    settings.update(overrides)
    return GatewayContext(**settings)


@pytest.fixture(scope="module")
def gateway(
    fakes: FakeServices, tokens: Tokens, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    context = edge_context(fakes, tokens)
    with run_gateway(context, tmp_path_factory.mktemp("envoy")) as url:
        yield url


@pytest.fixture
def client(gateway: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway, timeout=10) as http:
        yield http


@pytest.fixture(autouse=True)
def reset_fakes(fakes: FakeServices) -> Iterator[None]:
    yield
    fakes.behaviours.clear()
    for name in fakes.SERVICES:
        fakes.set_serving(name, True)


@pytest.fixture
def channel(gateway: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(gateway.removeprefix("http://")) as grpc_channel:
        yield grpc_channel


def rest_request(method: RestMethod) -> tuple[str, str]:
    """A concrete path for the method (path variables filled in) and its HTTP verb."""
    values = {"id": "42", "user_id": "42", "code": FAKE_CODE, "event_id": FAKE_EVENT_ID}
    path = method.path
    for name in method.path_params:
        path = path.replace("{" + name + "}", values[name])
    return method.http_method, path


def call(client: httpx.Client, method: RestMethod, tokens: Tokens, **kwargs: Any) -> httpx.Response:
    verb, path = rest_request(method)
    headers = kwargs.pop("headers", {})
    if not method.public:
        headers.setdefault("authorization", f"Bearer {tokens.sign()}")
    if method.body and "json" not in kwargs and "content" not in kwargs:
        kwargs["json"] = {}
    return client.request(verb, path, headers=headers, **kwargs)


def grpc_headers(response: httpx.Response) -> list[str]:
    return [name for name in response.headers if name.lower().startswith("grpc-")]


def methods() -> tuple[RestMethod, ...]:
    return rest_api()


def by_name(full_name: str) -> RestMethod:
    return next(m for m in methods() if m.full_name == full_name)


REGISTER = "cake.auth.v1.AuthService/Register"
LOGIN = "cake.auth.v1.AuthService/Login"
PROFILE = "cake.auth.v1.AuthService/GetProfile"
LIST_CAMPAIGNS = "cake.promotions.v1.PromotionsService/ListCampaigns"
GET_CAMPAIGN = "cake.promotions.v1.PromotionsService/GetCampaign"
CREATE_CAMPAIGN = "cake.promotions.v1.PromotionsService/CreateCampaign"
TOPUP = "cake.promotions.v1.PromotionsService/Topup"
HEALTH = f"{HEALTH_SERVICE}/GetSystemHealth"
QUEUE_STATS = "cake.events.v1.EventAdminService/GetQueueStats"


# -- every route -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", methods(), ids=lambda m: f"{m.http_method} {m.path}")
def test_every_rest_route_reaches_its_rpc_with_the_path_variables(
    client: httpx.Client, fakes: FakeServices, tokens: Tokens, method: RestMethod
) -> None:
    response = call(client, method, tokens)

    assert response.status_code == method.success_status, response.text
    assert response.headers["content-type"] == "application/json"
    assert grpc_headers(response) == []
    received = fakes.last_call(method.full_name)
    assert received.metadata["x-envoy-original-path"] == rest_request(method)[1]
    if "id" in method.path_params:
        assert received.request["id"] == "42"
    if "code" in method.path_params:
        assert received.request["code"] == FAKE_CODE
    if "event_id" in method.path_params:
        assert received.request["eventId"] == FAKE_EVENT_ID


def test_register_and_campaign_creation_answer_201_and_others_200(
    client: httpx.Client, tokens: Tokens
) -> None:
    statuses = {m.full_name: call(client, m, tokens).status_code for m in methods()}

    assert {name for name, status in statuses.items() if status == 201} == {
        REGISTER,
        CREATE_CAMPAIGN,
    }
    assert set(statuses.values()) == {200, 201}


@pytest.mark.parametrize(
    "method", [m for m in methods() if m.response_body], ids=lambda m: m.full_name
)
def test_wrapped_responses_come_back_bare(
    client: httpx.Client, fakes: FakeServices, tokens: Tokens, method: RestMethod
) -> None:
    # A repeated field of two items, or a message with an id: recognisable either way.
    response_fields = {
        "campaigns": [{"id": "1", "name": "a"}, {"id": "2", "name": "b"}],
        "promotions": [{"id": "1"}, {"id": "2"}],
        "vouchers": [{"id": "1", "code": FAKE_CODE}, {"id": "2"}],
        "campaign": {"id": "7", "name": "first login"},
        "voucher": {"id": "7", "code": FAKE_CODE},
        "user": {"id": "7", "username": "bob"},
        "notification": {"id": "7", "title": "a voucher"},
        # No id in preferences: a non-default language is what is recognisable.
        "preferences": {"language": "en", "email": True},
    }
    value = response_fields[method.response_body]
    fakes.behaviours[method.full_name] = lambda _: {method.response_body: value}

    body = call(client, method, tokens).json()

    if isinstance(value, list):
        assert [item["id"] for item in body] == ["1", "2"]
    else:
        key = "id" if "id" in value else "language"
        assert body[key] == value[key]
        # Defaults are printed: a Cake client sees every field.
        assert method.response_body not in body
        assert len(body) > len(value)


def test_empty_lists_come_back_as_empty_arrays(client: httpx.Client, tokens: Tokens) -> None:
    assert call(client, by_name(LIST_CAMPAIGNS), tokens).json() == []


def test_service_errors_pass_unchanged_on_wrapped_routes(
    client: httpx.Client, fakes: FakeServices, tokens: Tokens
) -> None:
    fakes.behaviours[GET_CAMPAIGN] = lambda _: FakeError(
        code_pb2.NOT_FOUND,
        "Campaign not found",
        [error_details_pb2.ErrorInfo(reason="CAMPAIGN_NOT_FOUND", domain="cake")],
    )

    response = call(client, by_name(GET_CAMPAIGN), tokens)

    assert response.status_code == 404
    assert response.json() == {
        "code": 5,
        "message": "Campaign not found",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "CAMPAIGN_NOT_FOUND",
                "domain": "cake",
                "metadata": {},
            }
        ],
    }
    assert grpc_headers(response) == []


def test_validation_errors_keep_their_field_violations(
    client: httpx.Client, fakes: FakeServices, tokens: Tokens
) -> None:
    violation = error_details_pb2.BadRequest.FieldViolation(field="email", description="bad")
    fakes.behaviours[REGISTER] = lambda _: FakeError(
        code_pb2.INVALID_ARGUMENT,
        "Validation failed",
        [error_details_pb2.BadRequest(field_violations=[violation])],
    )

    response = call(client, by_name(REGISTER), tokens, json={"email": "nope"})

    assert response.status_code == 400
    detail = response.json()["details"][0]
    assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert [(v["field"], v["description"]) for v in detail["fieldViolations"]] == [("email", "bad")]


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (code_pb2.ALREADY_EXISTS, 409),
        (code_pb2.UNAUTHENTICATED, 401),
        (code_pb2.PERMISSION_DENIED, 403),
        (code_pb2.FAILED_PRECONDITION, 400),
        (code_pb2.RESOURCE_EXHAUSTED, 429),
        (code_pb2.UNAVAILABLE, 503),
        (code_pb2.INTERNAL, 500),
    ],
)
def test_grpc_codes_become_http_statuses(
    client: httpx.Client, fakes: FakeServices, tokens: Tokens, code: int, status: int
) -> None:
    fakes.behaviours[REGISTER] = lambda _: FakeError(code, "from the service")

    response = call(client, by_name(REGISTER), tokens)

    assert response.status_code == status
    assert response.json() == {"code": code, "message": "from the service", "details": []}


# -- /health -----------------------------------------------------------------------------------


def test_health_reports_the_events_service_verdict(
    client: httpx.Client, fakes: FakeServices
) -> None:
    healthy = {"status": "healthy", "checks": {"auth": "healthy"}, "uptime": 3.5}
    fakes.behaviours[HEALTH] = lambda _: healthy
    first = client.get("/health")
    fakes.behaviours[HEALTH] = lambda _: {**healthy, "status": "unhealthy", "error": "db"}
    second = client.get("/health")
    fakes.behaviours[HEALTH] = lambda _: {**healthy, "status": "degraded"}
    third = client.get("/health")

    assert (first.status_code, first.json()["status"]) == (200, "healthy")
    assert first.json()["checks"] == {"auth": "healthy"}
    assert (second.status_code, second.json()["status"]) == (503, "unhealthy")
    assert second.json()["error"] == "db"
    assert (third.status_code, third.json()["status"]) == (200, "degraded")
    assert grpc_headers(second) == []


def test_health_details_still_answer_when_events_reports_not_serving(
    client: httpx.Client, fakes: FakeServices, tokens: Tokens
) -> None:
    fakes.behaviours[HEALTH] = lambda _: {"status": "unhealthy", "error": "events_database"}
    fakes.set_serving("events", False)
    # Envoy's health check sees NOT_SERVING within a second or two.
    deadline = time.monotonic() + 15
    while call(client, by_name(QUEUE_STATS), tokens).status_code != 503:
        assert time.monotonic() < deadline, "the events cluster never turned unhealthy"
        time.sleep(0.2)

    admin = call(client, by_name(QUEUE_STATS), tokens)
    health_answer = client.get("/health")
    fakes.set_serving("events", True)
    while call(client, by_name(QUEUE_STATS), tokens).status_code != 200:
        assert time.monotonic() < deadline + 15, "the events cluster never recovered"
        time.sleep(0.2)

    assert admin.json() == {"code": 14, "message": "no healthy upstream", "details": []}
    assert health_answer.status_code == 503
    assert health_answer.json()["error"] == "events_database"


def test_health_is_a_json_503_when_events_cannot_be_reached(
    fakes: FakeServices, tokens: Tokens, tmp_path: Path
) -> None:
    context = edge_context(
        fakes,
        tokens,
        upstreams=local_upstreams(
            auth_port=fakes.ports["auth"],
            promotions_port=fakes.ports["promotions"],
            events_port=free_port(),  # nothing listens there
            notifications_port=fakes.ports["notifications"],
        ),
    )
    with run_gateway(context, tmp_path) as url:
        response = httpx.get(f"{url}/health", timeout=10)

    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["status"] == "unhealthy"
    assert body["checks"] == {"gateway": "healthy", "events": "unhealthy"}
    assert body["error"] == "events service unavailable"
    assert body["details"]["code"] == 14
    assert body["timestamp"].endswith("Z")


def test_native_grpc_health_calls_keep_grpc_semantics(
    channel: grpc.Channel, fakes: FakeServices
) -> None:
    from cake.events.v1 import health_pb2 as system_health_pb2
    from cake.events.v1 import health_pb2_grpc as system_health_pb2_grpc

    fakes.behaviours[HEALTH] = lambda _: {"status": "unhealthy"}
    stub = system_health_pb2_grpc.SystemHealthServiceStub(channel)

    reply = stub.GetSystemHealth(system_health_pb2.GetSystemHealthRequest(), timeout=5)

    assert reply.status == "unhealthy"


# -- edge JWT --------------------------------------------------------------------------------


def bad_tokens(tokens: Tokens) -> dict[str, str]:
    good = tokens.sign()
    header, _, signature = good.split(".")
    now = int(time.time())
    other_key = ec.generate_private_key(ec.SECP256R1())
    return {
        "expired": tokens.sign(iat=now - 7200, exp=now - 3600),
        "tampered": f"{header}.{b64url(tokens.claims(role='admin'))}.{signature}",
        "alg_none": f"{b64url({'alg': 'none', 'typ': 'JWT', 'kid': KID})}."
        f"{b64url(tokens.claims())}.",
        "hs256_with_public_key": tokens.hs256_with_public_key(),
        "wrong_issuer": tokens.sign(iss="someone-else"),
        "wrong_audience": tokens.sign(aud="another-api"),
        "unknown_kid": jwt.encode(
            tokens.claims(), other_key, algorithm="ES256", headers={"kid": "rotated-out"}
        ),
        "other_key_same_kid": jwt.encode(
            tokens.claims(), other_key, algorithm="ES256", headers={"kid": KID}
        ),
        "not_a_jwt": "not-a-token",
    }


BAD_TOKEN_NAMES = (
    "expired",
    "tampered",
    "alg_none",
    "hs256_with_public_key",
    "wrong_issuer",
    "wrong_audience",
    "unknown_kid",
    "other_key_same_kid",
    "not_a_jwt",
)


def test_protected_rest_routes_need_a_token(client: httpx.Client, fakes: FakeServices) -> None:
    before = len(fakes.calls)
    response = client.get("/auth/profile")

    assert response.status_code == 401
    assert response.json() == {"code": 16, "message": "Jwt is missing", "details": []}
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert len(fakes.calls) == before


@pytest.mark.parametrize("name", BAD_TOKEN_NAMES)
def test_bad_tokens_are_rejected_at_the_edge_over_rest(
    client: httpx.Client, fakes: FakeServices, tokens: Tokens, name: str
) -> None:
    before = len(fakes.calls)
    response = client.get(
        "/auth/profile", headers={"authorization": f"Bearer {bad_tokens(tokens)[name]}"}
    )

    assert response.status_code == 401, response.text
    body = response.json()
    assert body["code"] == 16
    assert body["message"]
    assert len(fakes.calls) == before


@pytest.mark.parametrize("name", (*BAD_TOKEN_NAMES, "missing"))
def test_bad_tokens_are_rejected_at_the_edge_over_native_grpc(
    channel: grpc.Channel, fakes: FakeServices, tokens: Tokens, name: str
) -> None:
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    token = None if name == "missing" else bad_tokens(tokens)[name]
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    before = len(fakes.calls)

    with pytest.raises(grpc.RpcError) as failure:
        stub.GetProfile(auth_pb2.GetProfileRequest(), metadata=metadata, timeout=5)

    assert failure.value.code() is grpc.StatusCode.UNAUTHENTICATED
    # A plain message, not a JSON document: gRPC clients keep gRPC semantics.
    assert not (failure.value.details() or "").startswith("{")
    assert len(fakes.calls) == before


def test_valid_tokens_pass_over_rest_and_native_grpc(
    client: httpx.Client, channel: grpc.Channel, fakes: FakeServices, tokens: Tokens
) -> None:
    fakes.behaviours[PROFILE] = lambda _: {"user": {"id": "42", "username": "bob"}}
    token = tokens.sign()
    stub = auth_pb2_grpc.AuthServiceStub(channel)

    rest = client.get("/auth/profile", headers={"authorization": f"bearer {token}"})
    native = stub.GetProfile(
        auth_pb2.GetProfileRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=5
    )

    assert rest.status_code == 200
    assert rest.json()["username"] == "bob"
    assert native.user.username == "bob"


def test_public_methods_need_no_token_over_native_grpc(
    channel: grpc.Channel, fakes: FakeServices
) -> None:
    fakes.behaviours[LIST_CAMPAIGNS] = lambda _: {"campaigns": [{"id": "1"}]}
    stub = promotions_pb2_grpc.PromotionsServiceStub(channel)

    reply = stub.ListCampaigns(promotions_pb2.ListCampaignsRequest(), timeout=5)

    assert [campaign.id for campaign in reply.campaigns] == [1]


def test_native_grpc_errors_keep_their_rich_status(
    channel: grpc.Channel, fakes: FakeServices
) -> None:
    fakes.behaviours[LOGIN] = lambda _: FakeError(
        code_pb2.UNAUTHENTICATED,
        "Invalid credentials",
        [error_details_pb2.ErrorInfo(reason="INVALID_CREDENTIALS", domain="cake")],
    )
    stub = auth_pb2_grpc.AuthServiceStub(channel)

    with pytest.raises(grpc.RpcError) as failure:
        stub.Login(auth_pb2.LoginRequest(account="a", password="b"), timeout=5)

    status = rpc_status.from_call(failure.value)  # type: ignore[arg-type]
    assert status is not None
    assert status.message == "Invalid credentials"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == "INVALID_CREDENTIALS"


def test_unknown_native_grpc_method_is_unimplemented(channel: grpc.Channel, tokens: Tokens) -> None:
    unknown = channel.unary_unary(
        "/cake.auth.v1.AuthService/NoSuchMethod",
        request_serializer=lambda data: data,
        response_deserializer=lambda data: data,
    )

    with pytest.raises(grpc.RpcError) as failure:
        unknown(b"", metadata=(("authorization", f"Bearer {tokens.sign()}"),), timeout=5)

    assert failure.value.code() is grpc.StatusCode.UNIMPLEMENTED


# -- headers to and from the services ---------------------------------------------------------


def test_verified_claims_client_ip_and_request_metadata_reach_the_service(
    client: httpx.Client, fakes: FakeServices, tokens: Tokens
) -> None:
    token = tokens.sign(sub="42", role="admin")
    response = client.post(
        "/promotions/topup",
        json={"phoneNumber": "+123456789", "amount": 10},
        headers={
            "authorization": f"Bearer {token}",
            "x-request-id": "req-123",
            "idempotency-key": "idem-1",
            "user-agent": "cake-mobile/5.0",
        },
    )

    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-123"
    metadata = fakes.last_call(TOPUP).metadata
    assert metadata["authorization"] == f"Bearer {token}"  # services verify it again
    assert metadata["x-request-id"] == "req-123"
    assert metadata["idempotency-key"] == "idem-1"
    assert metadata["user-agent"] == "cake-mobile/5.0"
    assert metadata[CLIENT_IP_HEADER] == "127.0.0.1"
    assert metadata[USER_ID_HEADER] == "42"
    assert metadata[USER_ROLE_HEADER] == "admin"
    payload = json.loads(base64.urlsafe_b64decode(metadata[JWT_PAYLOAD_HEADER] + "=="))
    assert payload["sub"] == "42"
    assert payload["role"] == "admin"


def test_a_request_id_is_made_when_the_client_sends_none(
    client: httpx.Client, fakes: FakeServices
) -> None:
    response = client.get("/promotions/campaigns")

    sent = fakes.last_call(LIST_CAMPAIGNS).metadata["x-request-id"]
    assert uuid.UUID(sent)
    assert response.headers["x-request-id"] == sent


@pytest.mark.parametrize("route", ["/auth/profile", "/promotions/campaigns"])
def test_gateway_headers_forged_by_the_client_are_dropped(
    client: httpx.Client, fakes: FakeServices, tokens: Tokens, route: str
) -> None:
    forged = {
        USER_ID_HEADER: "1",
        USER_ROLE_HEADER: "admin",
        JWT_PAYLOAD_HEADER: b64url({"sub": "1", "role": "admin"}),
        CLIENT_IP_HEADER: "203.0.113.9",
        "x-cake-anything": "x",
    }
    token = tokens.sign(sub="42", role="user")
    headers = {**forged, "authorization": f"Bearer {token}"}

    assert client.get(route, headers=headers).status_code == 200

    method = PROFILE if route == "/auth/profile" else LIST_CAMPAIGNS
    metadata = fakes.last_call(method).metadata
    assert metadata[CLIENT_IP_HEADER] == "127.0.0.1"
    assert "x-cake-anything" not in metadata
    if method == PROFILE:  # verified: the token's claims, not the forged ones
        assert (metadata[USER_ID_HEADER], metadata[USER_ROLE_HEADER]) == ("42", "user")
    else:  # public route, no verification: no claims at all
        assert USER_ID_HEADER not in metadata
        assert USER_ROLE_HEADER not in metadata
        assert JWT_PAYLOAD_HEADER not in metadata


def test_forwarded_for_from_the_client_does_not_change_the_client_ip(
    client: httpx.Client, fakes: FakeServices
) -> None:
    client.get("/promotions/campaigns", headers={"x-forwarded-for": "198.51.100.7"})

    assert fakes.last_call(LIST_CAMPAIGNS).metadata[CLIENT_IP_HEADER] == "127.0.0.1"


def test_security_headers_on_service_and_gateway_answers(client: httpx.Client) -> None:
    for response in (client.get("/promotions/campaigns"), client.get("/no/such/path")):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["cache-control"] == "no-store"
        assert "x-envoy-upstream-service-time" not in response.headers


def test_cors_preflight_and_allowed_origin(client: httpx.Client) -> None:
    origin = "https://app.cake.example"
    preflight = client.options(
        "/auth/login",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type,authorization",
        },
    )
    actual = client.get("/promotions/campaigns", headers={"origin": origin})
    stranger = client.get("/promotions/campaigns", headers={"origin": "https://evil.example"})

    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == origin
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"]
    assert actual.headers["access-control-allow-origin"] == origin
    assert "x-ratelimit-remaining" in actual.headers["access-control-expose-headers"]
    assert "access-control-allow-origin" not in stranger.headers


# -- bad requests --------------------------------------------------------------------------


def test_unknown_body_fields_are_rejected_with_the_field_named(
    client: httpx.Client, fakes: FakeServices
) -> None:
    before = len(fakes.calls)
    response = client.post(
        "/auth/login", json={"account": "bob", "password": "pw", "rememberMe": True}
    )

    assert response.status_code == 400
    assert response.json() == {
        "code": 3,
        "message": "property rememberMe should not exist",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [
                    {"field": "rememberMe", "description": "property rememberMe should not exist"}
                ],
            }
        ],
    }
    assert len(fakes.calls) == before


@pytest.mark.parametrize(
    "body",
    [
        {"phoneNumber": "+1234567", "amount": 5, "voucherCode": FAKE_CODE},
        {"phone_number": "+1234567", "amount": 5, "voucher_code": FAKE_CODE},  # proto names
    ],
)
def test_known_body_fields_pass_under_json_or_proto_names(
    client: httpx.Client, fakes: FakeServices, tokens: Tokens, body: dict[str, Any]
) -> None:
    response = call(client, by_name(TOPUP), tokens, json=body)

    assert response.status_code == 200, response.text
    assert fakes.last_call(TOPUP).request["phoneNumber"] == "+1234567"


def test_unknown_fields_hidden_by_escapes_or_path_variables_are_rejected(
    client: httpx.Client, tokens: Tokens
) -> None:
    escaped = client.post(
        "/auth/login",
        content=b'{"account": "a", "\\u0070assword": "b", "x\\"y": 1}',
        headers={"content-type": "application/json"},
    )
    path_variable = call(
        client,
        by_name("cake.promotions.v1.PromotionsService/UpdateCampaignStatus"),
        tokens,
        json={"status": "active", "id": "7"},
    )

    assert escaped.status_code == 400
    assert escaped.json()["message"] == 'property x"y should not exist'
    assert path_variable.status_code == 400
    assert path_variable.json()["message"] == "property id should not exist"


def test_malformed_json_is_a_400(client: httpx.Client, fakes: FakeServices) -> None:
    before = len(fakes.calls)
    response = client.post(
        "/auth/login", content=b'{"account": ', headers={"content-type": "application/json"}
    )

    assert response.status_code == 400
    body = response.json()
    assert body["code"] == 3
    assert body["message"]
    assert len(fakes.calls) == before


def test_wrong_json_type_is_a_400(client: httpx.Client) -> None:
    response = client.post("/auth/login", json={"account": ["a"], "password": "b"})

    assert response.status_code == 400
    assert response.json()["code"] == 3


def test_unknown_query_parameter_is_a_400(client: httpx.Client) -> None:
    response = client.get("/promotions/campaigns", params={"page": "2"})

    assert response.status_code == 400
    assert response.json()["code"] == 3
    assert "page" in response.json()["message"]


@pytest.mark.parametrize(
    ("verb", "path"), [("GET", "/no/such/path"), ("DELETE", "/auth/profile"), ("GET", "/Health")]
)
def test_unknown_path_or_verb_is_a_json_404(client: httpx.Client, verb: str, path: str) -> None:
    response = client.request(verb, path)

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"code": 5, "message": f"Cannot {verb} {path}", "details": []}


def test_body_over_one_megabyte_is_a_413(client: httpx.Client, fakes: FakeServices) -> None:
    before = len(fakes.calls)
    response = client.post("/auth/register", json={"fullname": "x" * (2 * 1024 * 1024)})

    assert response.status_code == 413
    assert response.json() == {"code": 8, "message": "Payload Too Large", "details": []}
    assert len(fakes.calls) == before


def test_body_just_under_the_limit_is_accepted(client: httpx.Client, fakes: FakeServices) -> None:
    response = client.post("/auth/register", json={"fullname": "x" * (1024 * 1024 - 100)})

    assert response.status_code == 201
    assert len(fakes.last_call(REGISTER).request["fullname"]) == 1024 * 1024 - 100


# -- retries ----------------------------------------------------------------------------------


def flaky(times: int, answer: dict[str, Any]) -> Behaviour:
    """UNAVAILABLE for the first ``times`` calls, then ``answer``."""
    failures = iter(range(times))

    def behaviour(_: dict[str, Any]) -> dict[str, Any] | FakeError:
        if next(failures, None) is not None:
            return FakeError(code_pb2.UNAVAILABLE, "try again")
        return answer

    return behaviour


def test_reads_are_retried_on_unavailable(client: httpx.Client, fakes: FakeServices) -> None:
    fakes.behaviours[LIST_CAMPAIGNS] = flaky(2, {"campaigns": [{"id": "5"}]})
    before = len(fakes.calls)

    response = client.get("/promotions/campaigns")

    assert response.status_code == 200
    assert [c["id"] for c in response.json()] == ["5"]
    assert len(fakes.calls) - before == 3


def test_writes_are_never_retried(
    client: httpx.Client, fakes: FakeServices, tokens: Tokens
) -> None:
    fakes.behaviours[TOPUP] = flaky(1, {"success": True})
    before = len(fakes.calls)

    response = call(client, by_name(TOPUP), tokens, json={"phoneNumber": "+1234567", "amount": 1})

    assert response.status_code == 503
    assert len(fakes.calls) - before == 1


# -- the OpenAPI document ----------------------------------------------------------------------


def test_openapi_document_is_served_as_generated(client: httpx.Client) -> None:
    response = client.get("/openapi.json")

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.content == default_openapi_path().read_bytes()
    assert response.json()["paths"]["/auth/register"]["post"]["responses"]["201"]
