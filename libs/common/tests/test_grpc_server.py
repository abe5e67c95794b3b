"""A real grpc.aio server on port 0 with the full interceptor chain, driven by a real client."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import sqlalchemy.exc
from cake_common.auth_context import current_principal, principal_var, require_admin
from cake_common.errors import FieldViolation, InvalidArgument, NotFound
from cake_common.grpc_server import (
    DependencyCheck,
    GrpcServerBuilder,
    RunningGrpcServer,
    add_response_header,
)
from cake_common.grpc_server import interceptors as interceptors_module
from cake_common.grpc_server.call_scope import metadata_value
from cake_common.jwt import JwtVerifier, Principal
from cake_common.logging import request_id_var
from google.protobuf import wrappers_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

SERVICE = "cake.test.v1.TestService"
ECHO = f"/{SERVICE}/Echo"
PUBLIC = f"/{SERVICE}/Public"
ADMIN_ONLY = f"/{SERVICE}/AdminOnly"
FAIL = f"/{SERVICE}/Fail"
STREAM = f"/{SERVICE}/Stream"
SLOW = f"/{SERVICE}/Slow"
WITH_HEADER = f"/{SERVICE}/WithHeader"
METADATA = f"/{SERVICE}/Metadata"

StringValue = wrappers_pb2.StringValue


def _describe_caller() -> str:
    principal = principal_var.get()
    who = f"{principal.user_id}:{principal.role}" if principal else "anonymous"
    return f"{request_id_var.get()}|{who}"


async def _echo(request: StringValue, context: Any) -> StringValue:
    current_principal()
    return StringValue(value=_describe_caller())


async def _public(request: StringValue, context: Any) -> StringValue:
    return StringValue(value=_describe_caller())


async def _admin_only(request: StringValue, context: Any) -> StringValue:
    return StringValue(value=str(require_admin().user_id))


async def _fail(request: StringValue, context: Any) -> StringValue:
    kind = request.value
    if kind == "not_found":
        raise NotFound("Campaign not found", reason="CAMPAIGN_NOT_FOUND", metadata={"id": "9"})
    if kind == "invalid":
        raise InvalidArgument("Validation failed", [FieldViolation("email", "must be an email")])
    if kind == "database_down":
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("refused"))
    if kind == "abort":
        await context.abort(grpc.StatusCode.DATA_LOSS, "handler chose this")
    raise RuntimeError("secret internal detail: password=hunter2")


async def _stream(request: StringValue, context: Any) -> AsyncIterator[StringValue]:
    for index in range(2):
        yield StringValue(value=f"{index}|{_describe_caller()}")


async def _metadata(request: StringValue, context: Any) -> StringValue:
    # The keys named in the request, as the handler's metadata_value sees them; a yield to
    # the event loop in between, so concurrent calls interleave.
    seen = []
    for key in request.value.split(","):
        await asyncio.sleep(0)
        seen.append(f"{key}={metadata_value(context, key)}")
    return StringValue(value=";".join(seen))


async def _with_header(request: StringValue, context: Any) -> StringValue:
    add_response_header("Idempotent-Replayed", "true")
    return StringValue(value="ok")


#: One entry per Slow call that reached its handler (tests wait on it instead of sleeping).
_slow_started: asyncio.Queue[str] = asyncio.Queue()


#: A Slow call stays in flight until the test sets this (no sleep decides the timing).
_slow_release = asyncio.Event()


async def _slow(request: StringValue, context: Any) -> StringValue:
    _slow_started.put_nowait(request.value)
    await _slow_release.wait()
    return StringValue(value="done")


def _unary(behaviour: Any) -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.unary_unary_rpc_method_handler(
        behaviour,
        request_deserializer=StringValue.FromString,
        response_serializer=StringValue.SerializeToString,
    )


def _register(server: grpc.aio.Server) -> None:
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": _unary(_echo),
            "Public": _unary(_public),
            "AdminOnly": _unary(_admin_only),
            "Fail": _unary(_fail),
            "Slow": _unary(_slow),
            "WithHeader": _unary(_with_header),
            "Metadata": _unary(_metadata),
            "Stream": grpc.unary_stream_rpc_method_handler(
                _stream,
                request_deserializer=StringValue.FromString,
                response_serializer=StringValue.SerializeToString,
            ),
        },
    )
    server.add_generic_rpc_handlers((handler,))


class Client:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel

    def unary(self, method: str) -> Any:
        return self.channel.unary_unary(
            method,
            request_serializer=StringValue.SerializeToString,
            response_deserializer=StringValue.FromString,
        )

    async def call(
        self, method: str, value: str = "", metadata: tuple[tuple[str, str], ...] = ()
    ) -> tuple[str, dict[str, Any]]:
        call = self.unary(method)(StringValue(value=value), metadata=metadata)
        response = await call
        initial = {key: value for key, value in await call.initial_metadata()}
        return response.value, initial

    async def error(
        self, method: str, value: str = "", metadata: tuple[tuple[str, str], ...] = ()
    ) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await self.unary(method)(StringValue(value=value), metadata=metadata)
        return caught.value


class Revocations:
    def __init__(self) -> None:
        self.revoked: set[str] = set()
        self.broken = False

    async def is_revoked(self, principal: Principal) -> bool:
        if self.broken:
            raise ConnectionError("redis down")
        return principal.jti in self.revoked or principal.session_id in self.revoked


@pytest.fixture
def revocations() -> Revocations:
    return Revocations()


@pytest.fixture
async def running(
    verifier: JwtVerifier, revocations: Revocations
) -> AsyncIterator[RunningGrpcServer]:
    running = await (
        GrpcServerBuilder(service_names=[SERVICE], grace_seconds=1)
        .add_servicer(_register)
        .with_auth(
            verifier,
            public_methods=[PUBLIC, WITH_HEADER, METADATA],
            is_revoked=revocations.is_revoked,
        )
        .start()
    )
    yield running
    await running.stop()


@pytest.fixture
async def client(running: RunningGrpcServer) -> AsyncIterator[Client]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield Client(channel)


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# --- request id -------------------------------------------------------------------------


async def test_request_id_echoed_and_bound(client: Client) -> None:
    value, initial = await client.call(PUBLIC, metadata=(("x-request-id", "abc-123"),))
    assert initial["x-request-id"] == "abc-123"
    assert value == "abc-123|anonymous"


async def test_request_id_generated_when_missing_or_unsafe(client: Client) -> None:
    value, initial = await client.call(PUBLIC)
    generated = initial["x-request-id"]
    assert len(generated) == 36
    assert value.startswith(generated)
    for unsafe in ("bad id with spaces", "x" * 200, 'quote"injection'):
        _, initial = await client.call(PUBLIC, metadata=(("x-request-id", unsafe),))
        assert initial["x-request-id"] != unsafe


async def test_handlers_read_their_own_calls_metadata(client: Client) -> None:
    # The chain reads each call's metadata once into a dict: a duplicated key still answers
    # its first value, a binary (-bin) or absent key None, and 200 calls in flight at once
    # each see their own values, never another call's.
    async def one(index: int) -> None:
        call = client.channel.unary_unary(
            METADATA,
            request_serializer=StringValue.SerializeToString,
            response_deserializer=StringValue.FromString,
        )
        response = await call(
            StringValue(value="x-call,x-dup,x-blob-bin,x-absent"),
            metadata=(
                ("x-call", str(index)),
                ("x-dup", f"first-{index}"),
                ("x-dup", "second"),
                ("x-blob-bin", b"\x00\x01"),
            ),
        )
        assert response.value == (
            f"x-call={index};x-dup=first-{index};x-blob-bin=None;x-absent=None"
        )

    await asyncio.gather(*(one(index) for index in range(200)))


# --- authentication ---------------------------------------------------------------------


async def test_public_method_needs_no_token(client: Client) -> None:
    value, _ = await client.call(PUBLIC)
    assert value.endswith("|anonymous")


async def test_valid_token_binds_principal(client: Client, make_token: Any) -> None:
    value, _ = await client.call(ECHO, metadata=_bearer(make_token(sub="42", role="user")))
    assert value.endswith("|42:user")


async def test_missing_token(client: Client) -> None:
    error = await client.error(ECHO)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "Missing bearer token"


async def test_malformed_header(client: Client, make_token: Any) -> None:
    error = await client.error(ECHO, metadata=(("authorization", f"Token {make_token()}"),))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "Malformed authorization header"


@pytest.mark.parametrize(
    ("overrides", "details"),
    [
        ({"ttl": -5}, "Token has expired"),
        ({"aud": "other-audience"}, "Invalid token audience"),
        ({"headers": {"kid": "nope"}}, "Unknown token signing key"),
    ],
)
async def test_bad_tokens(
    client: Client, make_token: Any, overrides: dict[str, Any], details: str
) -> None:
    error = await client.error(ECHO, metadata=_bearer(make_token(**overrides)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == details


async def test_alg_none_and_hs256_and_tampered(
    client: Client, make_token: Any, signing_key: Any
) -> None:
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header, payload, signature = make_token().split(".")
    none_header = b64(json.dumps({"alg": "none", "kid": signing_key.kid}).encode())
    hs_header = b64(json.dumps({"alg": "HS256", "kid": signing_key.kid}).encode())
    hs_signature = b64(
        hmac.new(signing_key.public_pem, f"{hs_header}.{payload}".encode(), hashlib.sha256).digest()
    )
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "1"
    tampered = f"{header}.{b64(json.dumps(claims).encode())}.{signature}"
    for token in (f"{none_header}.{payload}.", f"{hs_header}.{payload}.{hs_signature}", tampered):
        error = await client.error(ECHO, metadata=_bearer(token))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_unauthenticated_is_rich(client: Client) -> None:
    error = await client.error(ECHO, metadata=(("x-request-id", "r-1"),))
    status = rpc_status.from_call(error)  # also checks code/message match the rich status
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == "TOKEN_MISSING"


async def test_revoked_token(client: Client, make_token: Any, revocations: Revocations) -> None:
    token = make_token(jti="revoked-jti")
    revocations.revoked.add("revoked-jti")
    error = await client.error(ECHO, metadata=_bearer(token))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "Token has been revoked"


async def test_revoked_session(client: Client, make_token: Any, revocations: Revocations) -> None:
    token = make_token(sid="ended-session")
    revocations.revoked.add("ended-session")
    error = await client.error(ECHO, metadata=_bearer(token))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "Token has been revoked"


async def test_a_token_without_a_session_is_refused(client: Client, make_token: Any) -> None:
    error = await client.error(ECHO, metadata=_bearer(make_token(drop=("sid",))))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "Token is missing the sid claim"


async def test_revocation_check_failure_fails_open_for_users(
    client: Client, make_token: Any, revocations: Revocations
) -> None:
    revocations.broken = True
    value, _ = await client.call(ECHO, metadata=_bearer(make_token(sub="5")))
    assert value.endswith("|5:user")


async def test_revocation_check_failure_fails_closed_for_admins(
    client: Client, make_token: Any, revocations: Revocations
) -> None:
    revocations.broken = True
    error = await client.error(ADMIN_ONLY, metadata=_bearer(make_token(sub="3", role="admin")))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "Cannot check the token right now, please try again"


async def test_require_admin(client: Client, make_token: Any) -> None:
    error = await client.error(ADMIN_ONLY, metadata=_bearer(make_token(role="user")))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    value, _ = await client.call(ADMIN_ONLY, metadata=_bearer(make_token(sub="3", role="admin")))
    assert value == "3"


async def test_principal_does_not_leak_between_calls(client: Client, make_token: Any) -> None:
    await client.call(ECHO, metadata=_bearer(make_token(sub="77")))
    value, _ = await client.call(PUBLIC)
    assert value.endswith("|anonymous")


# --- error mapping ----------------------------------------------------------------------


def _rich(error: grpc.aio.AioRpcError) -> Any:
    from google.rpc import status_pb2

    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no grpc-status-details-bin trailer")


async def test_not_found_maps_with_error_info(client: Client, make_token: Any) -> None:
    error = await client.error(FAIL, "not_found", _bearer(make_token()))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "Campaign not found"
    status = _rich(error)
    assert status.code == grpc.StatusCode.NOT_FOUND.value[0]
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "CAMPAIGN_NOT_FOUND",
        "cake",
        {"id": "9"},
    )


async def test_invalid_argument_maps_with_bad_request(client: Client, make_token: Any) -> None:
    error = await client.error(FAIL, "invalid", _bearer(make_token()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_request = error_details_pb2.BadRequest()
    assert any(detail.Unpack(bad_request) for detail in _rich(error).details)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("email", "must be an email")
    ]


class RecordingLogger:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any], BaseException | None]] = []

    def __getattr__(self, level: str) -> Any:
        def log(event: str, **fields: Any) -> None:
            self.calls.append((level, event, fields, sys.exc_info()[1]))

        return log


async def test_unexpected_error_is_internal_without_details(
    client: Client, make_token: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = RecordingLogger()
    monkeypatch.setattr(interceptors_module, "_log", recorder)
    error = await client.error(FAIL, "boom", _bearer(make_token()))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "Internal error"
    assert "hunter2" not in str(error.trailing_metadata())
    ((level, _event, fields, exception),) = recorder.calls
    assert level == "exception", "logged with stack trace"
    assert fields["method"] == FAIL
    assert isinstance(exception, RuntimeError)


async def test_database_outage_is_unavailable(client: Client, make_token: Any) -> None:
    error = await client.error(FAIL, "database_down", _bearer(make_token()))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "Service temporarily unavailable"


async def test_handler_abort_passes_through(client: Client, make_token: Any) -> None:
    error = await client.error(FAIL, "abort", _bearer(make_token()))
    assert error.code() == grpc.StatusCode.DATA_LOSS
    assert error.details() == "handler chose this"


@pytest.mark.parametrize("method", [PUBLIC, ECHO, STREAM])
async def test_bytes_that_are_not_the_request_message_are_invalid_argument(
    client: Client, method: str
) -> None:
    # A truncated field: StringValue field 1 announces 5 bytes and carries 2. Checked before
    # authentication too (ECHO needs a token), so nothing downstream sees the bytes.
    raw = client.channel.unary_unary(method) if method != STREAM else None
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if raw is not None:
            await raw(b"\x0a\x05ab")
        else:
            _ = [item async for item in client.channel.unary_stream(STREAM)(b"\xff\xff\xff")]
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "request body is not a valid google.protobuf.StringValue message"
    info = error_details_pb2.ErrorInfo()
    assert any(detail.Unpack(info) for detail in _rich(error).details)
    assert info.reason == "UNDECODABLE_REQUEST"


async def test_valid_bytes_still_reach_the_handler(client: Client) -> None:
    response = await client.channel.unary_unary(PUBLIC)(StringValue(value="x").SerializeToString())
    assert StringValue.FromString(response).value.endswith("|anonymous")


async def test_unknown_method_is_unimplemented(client: Client) -> None:
    error = await client.error(f"/{SERVICE}/Nope")
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


# --- streaming passes through the same chain --------------------------------------------


async def test_server_streaming_is_intercepted(client: Client, make_token: Any) -> None:
    method = client.channel.unary_stream(
        STREAM,
        request_serializer=StringValue.SerializeToString,
        response_deserializer=StringValue.FromString,
    )
    call = method(StringValue(), metadata=(("x-request-id", "s-1"), *_bearer(make_token(sub="8"))))
    values = [response.value async for response in call]
    assert values == ["0|s-1|8:user", "1|s-1|8:user"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _ = [response async for response in method(StringValue())]
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- health and reflection --------------------------------------------------------------


async def _health(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    return int(response.status)


async def test_health_serving_without_token(client: Client) -> None:
    for name in ("", SERVICE, "liveness"):
        assert await _health(client.channel, name) == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_services(client: Client) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = set()
    async for response in stub.ServerReflectionInfo(requests()):
        names |= {service.name for service in response.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


async def test_reflection_can_be_switched_off() -> None:
    running = await (
        GrpcServerBuilder(service_names=[SERVICE], grace_seconds=0)
        .add_servicer(_register)
        .with_reflection(False)
        .start()
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)

            async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stub.ServerReflectionInfo(requests()):
                    pass
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await running.stop()


async def test_graceful_shutdown(verifier: JwtVerifier) -> None:
    hook_calls: list[str] = []

    async def first_hook() -> None:
        hook_calls.append("first")

    async def failing_hook() -> None:
        raise RuntimeError("hook broke")

    async def last_hook() -> None:
        hook_calls.append("last")

    running = await (
        GrpcServerBuilder(service_names=[SERVICE], grace_seconds=5)
        .add_servicer(_register)
        .add_shutdown_hook(first_hook)
        .add_shutdown_hook(failing_hook)
        .add_shutdown_hook(last_hook)
        .start()
    )
    _slow_release.clear()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        slow = Client(channel).unary(SLOW)(StringValue(value="in flight"))
        await asyncio.wait_for(_slow_started.get(), timeout=10)
        stopping = asyncio.create_task(running.stop())
        async with asyncio.timeout(10):
            while running.health.is_serving:  # noqa: ASYNC110 - no event to wait on
                await asyncio.sleep(0.01)
        assert not slow.done() and not stopping.done(), "the stop waits for the call"
        _slow_release.set()
        assert (await slow).value == "done", "in-flight call finishes within the grace period"
        await stopping
        await running.stop()  # idempotent
    assert hook_calls == ["last", "first"], "hooks run in reverse order despite a failure"


async def test_health_not_serving_during_shutdown_seen_by_client(verifier: JwtVerifier) -> None:
    running = await (
        GrpcServerBuilder(service_names=[SERVICE], grace_seconds=2).add_servicer(_register).start()
    )
    _slow_release.clear()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        slow = Client(channel).unary(SLOW)(StringValue(value="in flight"))
        await asyncio.wait_for(_slow_started.get(), timeout=10)
        await running.health.enter_graceful_shutdown()
        assert await _health(channel, "") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await _health(channel, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await _health(channel, "liveness") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not slow.done(), "health turned while a call was still in flight"
        _slow_release.set()
        await slow
    await running.stop()


async def test_serve_until_signal_stops_on_sigterm() -> None:
    running = await (
        GrpcServerBuilder(service_names=[SERVICE], grace_seconds=1).add_servicer(_register).start()
    )
    serving = asyncio.create_task(running.serve_until_signal(signals=(signal.SIGUSR1,)))
    # The loop's handler replaces the default one (which would end this process).
    async with asyncio.timeout(10):
        while signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    signal.raise_signal(signal.SIGUSR1)
    await asyncio.wait_for(serving, timeout=5)
    assert running.health.is_serving is False


async def test_critical_dependency_gates_overall_health() -> None:
    database_up = False

    async def database() -> None:
        if not database_up:
            raise ConnectionRefusedError("db down")

    async def cache() -> bool:
        return False

    running = await (
        GrpcServerBuilder(service_names=[SERVICE])
        .add_servicer(_register)
        .add_dependency_check(DependencyCheck("postgres", database))
        .add_dependency_check(DependencyCheck("redis", cache, critical=False))
        .with_check_interval(0.05)
        .start()
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            assert await _health(channel, "") == not_serving
            assert await _health(channel, "postgres") == not_serving
            assert await _health(channel, "redis") == not_serving
            assert await _health(channel, "liveness") == health_pb2.HealthCheckResponse.SERVING
            database_up = True
            for _ in range(100):
                if await _health(channel, "") == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.02)
            assert await _health(channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING
            assert await _health(channel, "redis") == not_serving, "non-critical stays down"
    finally:
        await running.stop()


async def test_port_clash_fails_loudly(running: RunningGrpcServer) -> None:
    builder = GrpcServerBuilder(service_names=[SERVICE], port=running.port)
    with pytest.raises(RuntimeError):
        await builder.start()


# --- metrics ----------------------------------------------------------------------------


async def test_metrics_count_codes_and_serve_http(verifier: JwtVerifier, make_token: Any) -> None:
    import urllib.request

    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    running = await (
        GrpcServerBuilder(service_names=[SERVICE])
        .add_servicer(_register)
        .with_auth(verifier, public_methods=[PUBLIC])
        .with_metrics(registry, port=0)
        .start()
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            client = Client(channel)
            await client.call(PUBLIC)
            await client.call(PUBLIC)
            await client.error(ECHO)
            await client.error(FAIL, "not_found", _bearer(make_token()))
            await client.error(FAIL, "boom", _bearer(make_token()))

        def labels(method: str) -> dict[str, str]:
            return {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": method}

        def handled(method: str, code: str) -> float | None:
            return registry.get_sample_value(
                "grpc_server_handled_total", {**labels(method), "grpc_code": code}
            )

        assert handled("Public", "OK") == 2
        assert handled("Echo", "UNAUTHENTICATED") == 1
        assert handled("Fail", "NOT_FOUND") == 1
        assert handled("Fail", "INTERNAL") == 1
        assert (
            registry.get_sample_value("grpc_server_handling_seconds_count", labels("Public")) == 2
        )
        assert registry.get_sample_value("grpc_server_started_total", labels("Public")) == 2
        assert registry.get_sample_value("grpc_server_started_total", labels("Fail")) == 2
        assert running.metrics_port
        url = f"http://127.0.0.1:{running.metrics_port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
        assert b"grpc_server_handled_total{" in body
    finally:
        await running.stop()
    import socket

    with socket.socket() as probe:
        # REUSEADDR tolerates TIME_WAIT leftovers but not a socket still listening.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", running.metrics_port))


async def test_metrics_collectors_shared_per_registry() -> None:
    from cake_common.grpc_server import MetricsInterceptor, grpc_server_metrics
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    MetricsInterceptor(registry)
    MetricsInterceptor(registry)  # a second server in the same process must not clash
    assert grpc_server_metrics(registry) is grpc_server_metrics(registry)


async def test_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from cake_common.settings import ServiceSettings
    from prometheus_client import CollectorRegistry

    monkeypatch.setenv("CAKE_DATABASE_URL", "postgresql+psycopg://u:p@h/db")
    monkeypatch.setenv("CAKE_SERVICE_NAME", "example")
    monkeypatch.setenv("CAKE_GRPC_PORT", "0")
    monkeypatch.setenv("CAKE_METRICS_PORT", "0")
    monkeypatch.setenv("CAKE_SHUTDOWN_GRACE_SECONDS", "0.5")
    settings = ServiceSettings()
    running = await (
        GrpcServerBuilder.from_settings(
            settings, service_names=[SERVICE], metrics_registry=CollectorRegistry()
        )
        .add_servicer(_register)
        .start()
    )
    try:
        assert running.port > 0
        assert running.metrics_port is not None and running.metrics_port > 0
    finally:
        await running.stop()


async def test_failed_start_releases_the_port(running: RunningGrpcServer) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        grpc_port = probe.getsockname()[1]
    builder = (
        GrpcServerBuilder(service_names=[SERVICE], port=grpc_port)
        .add_servicer(_register)
        .with_metrics(port=running.port)  # metrics port already taken: start fails
    )
    with pytest.raises(OSError):
        await builder.start()
    # The gRPC port was released, so a server can bind it again.
    again = await GrpcServerBuilder(service_names=[SERVICE], port=grpc_port).start()
    assert again.port == grpc_port
    await again.stop()


async def test_request_id_echo_in_trailers() -> None:
    running = await (
        GrpcServerBuilder(service_names=[SERVICE], request_id_echo="trailing_metadata")
        .add_servicer(_register)
        .start()
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            call = Client(channel).unary(PUBLIC)(StringValue(), metadata=(("x-request-id", "t-1"),))
            assert (await call).value == "t-1|anonymous"
            trailing = dict(await call.trailing_metadata())
            assert trailing["x-request-id"] == "t-1"
            assert "x-request-id" not in dict(await call.initial_metadata())
    finally:
        await running.stop()


async def test_handler_added_headers_join_initial_metadata(client: Client) -> None:
    _, initial = await client.call(WITH_HEADER, metadata=(("x-request-id", "h-1"),))
    assert initial["x-request-id"] == "h-1"
    assert initial["idempotent-replayed"] == "true"


async def test_handler_added_headers_in_trailing_mode_still_sent_as_headers() -> None:
    running = await (
        GrpcServerBuilder(service_names=[SERVICE], request_id_echo="trailing_metadata")
        .add_servicer(_register)
        .start()
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            _, initial = await Client(channel).call(WITH_HEADER)
            assert initial["idempotent-replayed"] == "true"
            assert "x-request-id" in initial
    finally:
        await running.stop()


def test_add_response_header_outside_a_call() -> None:
    with pytest.raises(RuntimeError, match="outside"):
        add_response_header("x-a", "b")


async def test_metadata_received_in_another_task_is_not_used() -> None:
    # The chain hands the metadata grpc.aio converted for the interceptors to the call's
    # scope only within the same task, and only once; otherwise the scope reads the call's
    # own context.
    from cake_common.grpc_server import call_scope

    class Context:
        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return (("x-call", "own"),)

    context: Any = Context()

    async def seen_in_scope() -> str | None:
        async with call_scope._CallMetadataScope(None, context):
            return metadata_value(context, "x-call")

    async def stash_then_read() -> tuple[str | None, str | None]:
        call_scope._received_metadata_var.set((asyncio.current_task(), (("x-call", "stashed"),)))
        return await seen_in_scope(), await seen_in_scope()

    assert await stash_then_read() == ("stashed", "own")  # used once
    other_task: Any = object()
    call_scope._received_metadata_var.set((other_task, (("x-call", "stale"),)))
    assert await seen_in_scope() == "own"
