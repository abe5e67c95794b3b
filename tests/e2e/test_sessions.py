"""Sessions through the real stack: a logout, logout-all, refresh-token reuse or an admin's
decision is honoured by every protected RPC of every service, over REST through Envoy and
over direct gRPC, within a second; what Redis being down means for user and admin tokens.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from cake.auth.v1 import auth_pb2, auth_pb2_grpc
from cake.events.v1 import admin_pb2, admin_pb2_grpc
from cake.promotions.v1 import promotions_pb2, promotions_pb2_grpc
from cake_devtools.stack import Stack

pytestmark = pytest.mark.e2e

PASSWORD = "sessions-pass-1"
REVOCATION_DEADLINE_SECONDS = 1.0


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def _phone() -> str:
    return "+849" + str(uuid.uuid4().int)[:9]


@dataclass
class Person:
    username: str
    user_id: str

    def body(self) -> dict[str, str]:
        return {"account": self.username, "password": PASSWORD}


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def client(full_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=full_stack.gateway_url, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def channels(full_stack: Stack) -> Iterator[dict[str, grpc.Channel]]:
    """Straight to each service (internal callers) and through the gateway."""
    environment = full_stack.service_environment()
    targets = {
        name: f"127.0.0.1:{environment[name][f'CAKE_{name.upper()}_GRPC_PORT']}"
        for name in ("auth", "promotions", "events")
    }
    targets["gateway"] = full_stack.gateway_url.removeprefix("http://")
    opened = {name: grpc.insecure_channel(target) for name, target in targets.items()}
    yield opened
    for channel in opened.values():
        channel.close()


def _register(client: httpx.Client) -> Person:
    username = _unique("sess")
    response = client.post(
        "/auth/register",
        json={
            "fullname": "Session Tester",
            "email": f"{username}@example.com",
            "username": username,
            "phone": _phone(),
            "password": PASSWORD,
            "birthday": "1991-03-04",
        },
    )
    assert response.status_code == 201, response.text
    answer = response.json()
    assert {"access_token", "refresh_token", "expires_in", "user"} <= set(answer)
    return Person(username, answer["user"]["id"])


def _login(client: httpx.Client, person: Person) -> dict[str, Any]:
    response = client.post("/auth/login", json=person.body())
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    assert answer["expires_in"] == 900
    assert answer["refresh_token"]
    return answer


@pytest.fixture(scope="module")
def admin(create_admin: Callable[..., None], client: httpx.Client) -> Person:
    username = _unique("sessadmin")
    create_admin(username, f"{username}@example.com", _phone(), PASSWORD)
    answer = _login(client, Person(username, ""))
    return Person(username, answer["user"]["id"])


# Every protected route of every service, as (what, REST call, gRPC call on a channel).
def _rest_probes(client: httpx.Client, token: str) -> dict[str, httpx.Response]:
    headers = _bearer(token)
    return {
        "auth GET /auth/profile": client.get("/auth/profile", headers=headers),
        "promotions GET /promotions/my-vouchers": client.get(
            "/promotions/my-vouchers", headers=headers
        ),
        "promotions POST /promotions/track-first-login": client.post(
            "/promotions/track-first-login", json={}, headers=headers
        ),
        "events GET /admin/events/queue-stats": client.get(
            "/admin/events/queue-stats", headers=headers
        ),
    }


def _grpc_probes(channels: dict[str, grpc.Channel], token: str) -> dict[str, grpc.StatusCode]:
    metadata = (("authorization", f"Bearer {token}"),)
    calls: dict[str, Callable[[grpc.Channel], Any]] = {
        "auth": lambda ch: auth_pb2_grpc.AuthServiceStub(ch).GetProfile(
            auth_pb2.GetProfileRequest(), metadata=metadata, timeout=10
        ),
        "promotions": lambda ch: promotions_pb2_grpc.PromotionsServiceStub(ch).ListMyVouchers(
            promotions_pb2.ListMyVouchersRequest(), metadata=metadata, timeout=10
        ),
        "events": lambda ch: admin_pb2_grpc.EventAdminServiceStub(ch).GetQueueStats(
            admin_pb2.GetQueueStatsRequest(), metadata=metadata, timeout=10
        ),
    }
    outcomes: dict[str, grpc.StatusCode] = {}
    for service, call in calls.items():
        for route in (service, "gateway"):
            try:
                call(channels[route])
                outcomes[f"{service} via {route}"] = grpc.StatusCode.OK
            except grpc.RpcError as error:
                outcomes[f"{service} via {route}"] = error.code()  # type: ignore[attr-defined]
    return outcomes


def _all_refused(
    client: httpx.Client,
    channels: dict[str, grpc.Channel],
    token: str,
    since: float | None = None,
) -> None:
    """Every probe, REST and gRPC, refuses ``token`` within REVOCATION_DEADLINE_SECONDS of
    ``since`` (default: now, for callers that call right after the revoking call returned)."""
    since = time.monotonic() if since is None else since
    while True:
        began = time.monotonic()
        rest = {what: r.status_code for what, r in _rest_probes(client, token).items()}
        native = _grpc_probes(channels, token)
        if set(rest.values()) == {401} and set(native.values()) == {
            grpc.StatusCode.UNAUTHENTICATED
        }:
            break
        # A round of probes that began after the deadline must find the token refused.
        assert began - since < REVOCATION_DEADLINE_SECONDS, (rest, native)
        time.sleep(0.02)
    # and it stays refused.
    assert {r.status_code for r in _rest_probes(client, token).values()} == {401}


def test_logout_is_refused_by_every_service_within_a_second(
    client: httpx.Client, channels: dict[str, grpc.Channel], admin: Person
) -> None:
    token = _login(client, admin)["access_token"]
    rest = {what: r.status_code for what, r in _rest_probes(client, token).items()}
    assert set(rest.values()) == {200}, rest
    assert set(_grpc_probes(channels, token).values()) == {grpc.StatusCode.OK}

    assert client.post("/auth/logout", json={}, headers=_bearer(token)).status_code == 200
    _all_refused(client, channels, token, since=time.monotonic())
    refused = client.get("/admin/events/queue-stats", headers=_bearer(token))
    assert refused.status_code == 401
    assert refused.json()["message"] == "Token has been revoked"


def test_logout_all_and_admin_end_sessions_reach_every_service(
    client: httpx.Client, channels: dict[str, grpc.Channel], admin: Person
) -> None:
    person = _register(client)
    phone, laptop = _login(client, person), _login(client, person)
    ended = client.post("/auth/logout-all", json={}, headers=_bearer(phone["access_token"]))
    assert ended.status_code == 200, ended.text
    assert ended.json() == {"endedSessions": 3}
    for token in (phone["access_token"], laptop["access_token"]):
        _all_refused(client, channels, token)

    tablet = _login(client, person)
    admin_token = _login(client, admin)["access_token"]
    path = f"/admin/users/{person.user_id}/end-sessions"
    forbidden = client.post(path, json={}, headers=_bearer(tablet["access_token"]))
    assert forbidden.status_code == 403
    ended = client.post(path, json={}, headers=_bearer(admin_token))
    assert (ended.status_code, ended.json()) == (200, {"endedSessions": 1})
    _all_refused(client, channels, tablet["access_token"])
    refresh = client.post("/auth/refresh", json={"refresh_token": tablet["refresh_token"]})
    assert refresh.status_code == 401
    missing = client.post(
        "/admin/users/987654321/end-sessions", json={}, headers=_bearer(admin_token)
    )
    assert missing.status_code == 404


def test_refresh_rotation_and_reuse_over_rest(
    client: httpx.Client, channels: dict[str, grpc.Channel]
) -> None:
    person = _register(client)
    session = _login(client, person)
    rotated = client.post("/auth/refresh", json={"refresh_token": session["refresh_token"]})
    assert rotated.status_code == 200, rotated.text
    second = rotated.json()
    assert second["refresh_token"] != session["refresh_token"]
    assert client.get("/auth/profile", headers=_bearer(second["access_token"])).is_success

    # The stolen first refresh token is presented again: the session ends for everyone.
    reused = client.post("/auth/refresh", json={"refresh_token": session["refresh_token"]})
    assert reused.status_code == 401
    assert reused.json()["message"] == (
        "Refresh token was already used; the session has been ended"
    )
    _all_refused(client, channels, second["access_token"])
    after = client.post("/auth/refresh", json={"refresh_token": second["refresh_token"]})
    assert after.status_code == 401
    # Unknown fields are still refused; an over-long token is a 400, not a 500.
    assert client.post("/auth/refresh", json={"refreshToken2": "x"}).status_code == 400
    assert client.post("/auth/refresh", json={"refresh_token": "x" * 300}).status_code == 400


def test_redis_down_fails_closed_for_admins_and_open_for_users(
    full_stack: Stack, client: httpx.Client, admin: Person
) -> None:
    person = _register(client)
    user_token = _login(client, person)["access_token"]
    admin_token = _login(client, admin)["access_token"]
    full_stack.stop("redis")
    try:
        deadline = time.monotonic() + 20
        while True:
            stats = client.get("/admin/events/queue-stats", headers=_bearer(admin_token))
            if stats.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert stats.status_code == 503, stats.text
        assert stats.json()["message"] == "Cannot check the token right now, please try again"
        campaigns = client.get("/promotions/my-vouchers", headers=_bearer(admin_token))
        assert campaigns.status_code == 503
        # Users keep working (the exposure is bounded by the 15-minute token lifetime).
        assert client.get("/promotions/my-vouchers", headers=_bearer(user_token)).is_success
        assert client.get("/auth/profile", headers=_bearer(user_token)).is_success
        # Logout cannot promise a revocation it could not store.
        logout = client.post("/auth/logout", json={}, headers=_bearer(user_token))
        assert logout.status_code == 503
    finally:
        full_stack.start("redis")
    deadline = time.monotonic() + 30
    while client.get("/admin/events/queue-stats", headers=_bearer(admin_token)).status_code != 200:
        assert time.monotonic() < deadline, "admin routes did not recover with Redis"
        time.sleep(0.3)
