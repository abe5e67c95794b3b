"""The attack matrix of issue 14, through the real stack: REST through Envoy and direct gRPC.

Sessions and revocation are in test_sessions.py, path spellings in
test_gateway_normalisation.py; this module covers the rest: guessing passwords concurrently
under every identifier, first-login vouchers for existing users, display-name spoofing and
clock skew.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import httpx
import jwt
import pytest
from cake.auth.v1 import auth_pb2, auth_pb2_grpc
from cake.promotions.v1 import promotions_pb2, promotions_pb2_grpc
from cake_auth.adapters.signing_keys import SigningKey
from cake_devtools.stack import Stack

pytestmark = pytest.mark.e2e

PASSWORD = "matrix-pass-1"
FREE_FAILURES = 5  # the auth service's default LOGIN_MAX_FAILURES


def allowed_checks(elapsed: float) -> int:
    """Password checks the default policy allows within ``elapsed`` seconds: the free ones,
    then one after 1 s, another 2 s later, 4 s later... (growing delays, no lock-out)."""
    extra, waited, delay = 0, 0.0, 1.0
    while waited + delay <= elapsed:
        waited += delay
        delay *= 2
        extra += 1
    return FREE_FAILURES + extra


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def _phone() -> str:
    return "+849" + str(uuid.uuid4().int)[:9]


@pytest.fixture(scope="module")
def client(full_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=full_stack.gateway_url, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def auth_channel(full_stack: Stack) -> Iterator[grpc.Channel]:
    port = full_stack.service_environment()["auth"]["CAKE_AUTH_GRPC_PORT"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel


@pytest.fixture(scope="module")
def promotions_channel(full_stack: Stack) -> Iterator[grpc.Channel]:
    port = full_stack.service_environment()["promotions"]["CAKE_PROMOTIONS_GRPC_PORT"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel


def _register(client: httpx.Client, **overrides: str) -> dict[str, Any]:
    username = _unique("atk")
    body = {
        "fullname": "Matrix Tester",
        "email": f"{username}@example.com",
        "username": username,
        "phone": _phone(),
        "password": PASSWORD,
        "birthday": "1992-05-06",
        **overrides,
    }
    response = client.post("/auth/register", json=body)
    assert response.status_code == 201, response.text
    return {**body, **response.json()}


def test_concurrent_guesses_over_rest_reach_the_password_check_five_times(
    full_stack: Stack, client: httpx.Client
) -> None:
    victim = _register(client)
    identifiers = [victim["username"], victim["email"], victim["phone"], victim["username"].upper()]
    # Another source address: the guesses count against this IP, not the suite's.
    transport = httpx.HTTPTransport(local_address="127.0.0.31")
    with httpx.Client(base_url=full_stack.gateway_url, transport=transport, timeout=30) as http:

        def guess(n: int) -> httpx.Response:
            return http.post(
                "/auth/login",
                json={"account": identifiers[n % 4], "password": f"guess-{n}"},
            )

        began = time.monotonic()
        with ThreadPoolExecutor(max_workers=12) as pool:
            responses = list(pool.map(guess, range(24)))
        elapsed = time.monotonic() - began
    statuses = [response.status_code for response in responses]
    # A throttled or busy answer says when to come back, as a header (not only in the body).
    for response in responses:
        if response.status_code in (429, 503):
            assert int(response.headers["retry-after"]) >= 1, response.headers
    # Counted before bcrypt: 24 concurrent guesses, only the allowance was checked.
    assert FREE_FAILURES <= statuses.count(401) <= allowed_checks(elapsed), statuses
    # The rest throttled (429) or, when more checks waited than the hash queue admits, refused
    # as busy (503) before the throttle counted them: either way never checked.
    assert statuses.count(401) + statuses.count(429) + statuses.count(503) == 24
    # The owner is delayed, not locked out: a second later the right password works.
    time.sleep(1.2)
    owner = client.post("/auth/login", json={"account": victim["email"], "password": PASSWORD})
    assert owner.status_code == 200, owner.text


def test_concurrent_guesses_over_grpc_are_counted_first(
    client: httpx.Client, auth_channel: grpc.Channel
) -> None:
    victim = _register(client)
    stub = auth_pb2_grpc.AuthServiceStub(auth_channel)
    spellings = [victim["username"], victim["email"], victim["phone"]]

    def guess(n: int) -> grpc.StatusCode:
        try:
            stub.Login(
                auth_pb2.LoginRequest(account=spellings[n % 3], password=f"guess-{n}"),
                metadata=(("x-cake-client-ip", "198.51.100.40"),),
                timeout=30,
            )
        except grpc.RpcError as error:
            return error.code()  # type: ignore[attr-defined,no-any-return]
        return grpc.StatusCode.OK

    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=20) as pool:
        codes = list(pool.map(guess, range(40)))
    elapsed = time.monotonic() - began
    checked = codes.count(grpc.StatusCode.UNAUTHENTICATED)
    assert FREE_FAILURES <= checked <= allowed_checks(elapsed), (checked, elapsed)
    refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) + codes.count(
        grpc.StatusCode.UNAVAILABLE  # the hash queue was full: refused before being counted
    )
    assert checked + refused == 40, codes


def test_existing_users_cannot_claim_first_login_vouchers(
    client: httpx.Client, promotions_channel: grpc.Channel
) -> None:
    account = _register(client)  # registered, never logged in: no first-login event
    headers = {"authorization": f"Bearer {account['access_token']}"}
    for _ in range(3):
        tracked = client.post("/promotions/track-first-login", json={}, headers=headers)
        assert tracked.status_code == 200
        assert tracked.json()["eligible"] is False
    native = promotions_pb2_grpc.PromotionsServiceStub(promotions_channel).TrackFirstLogin(
        promotions_pb2.TrackFirstLoginRequest(),
        metadata=(("authorization", f"Bearer {account['access_token']}"),),
        timeout=10,
    )
    assert not native.eligible
    assert client.get("/promotions/my-vouchers", headers=headers).json() == []


@pytest.mark.parametrize("fullname", ["\u202eelgooG", "\u200b\u200b", "Ann\u2066Lee"])
def test_spoofing_names_are_refused(client: httpx.Client, fullname: str) -> None:
    username = _unique("spoof")
    response = client.post(
        "/auth/register",
        json={
            "fullname": fullname,
            "email": f"{username}@example.com",
            "username": username,
            "phone": _phone(),
            "password": PASSWORD,
            "birthday": "1992-05-06",
        },
    )
    assert response.status_code == 400, response.text
    fields = {
        violation["field"]
        for detail in response.json()["details"]
        for violation in detail.get("fieldViolations", [])
    }
    assert fields == {"fullname"}


def test_clock_skew_within_envoys_allowance_is_accepted_everywhere(
    client: httpx.Client, auth_channel: grpc.Channel, signing_key: SigningKey
) -> None:
    account = _register(client)
    now = int(time.time())
    token = jwt.encode(
        {
            "sub": account["user"]["id"],
            "role": "user",
            "iss": "cake-system",
            "aud": "cake-users",
            "iat": now + 20,  # the issuer's clock runs 20 s ahead
            "exp": now + 600,
            "jti": uuid.uuid4().hex,
            "sid": uuid.uuid4().hex,
        },
        signing_key.private_key,
        algorithm="ES256",
        headers={"kid": signing_key.kid},
    )
    rest = client.get("/auth/profile", headers={"authorization": f"Bearer {token}"})
    assert rest.status_code == 200, rest.text
    native = auth_pb2_grpc.AuthServiceStub(auth_channel).GetProfile(
        auth_pb2.GetProfileRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=10
    )
    assert native.user.username == account["username"]
