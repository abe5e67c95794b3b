"""End-to-end through the gateway: every REST route of the Cake API against the real services,
the Cake System's scenarios, edge JWT checks with the stack's real keys (REST and native gRPC),
and the gateway's answers to bad requests.

The admin is made the way operators make one (``cake-auth create-admin``) and logs in through
the gateway; users register through it. Campaigns created here are set inactive afterwards so
they stop enrolling other tests' users.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import grpc
import httpx
import jwt
import pytest
from cake.auth.v1 import auth_pb2, auth_pb2_grpc
from cake.payments.v1 import payments_pb2, payments_pb2_grpc
from cake.promotions.v1 import promotions_pb2, promotions_pb2_grpc
from cake_auth.adapters.signing_keys import SigningKey
from cake_devtools.stack import Stack
from cryptography.hazmat.primitives.asymmetric import ec

pytestmark = pytest.mark.e2e

PASSWORD = "s3cret-pass"
VOUCHER_WAIT_SECONDS = 60


# -- clients and people ------------------------------------------------------------------------


@dataclass
class Account:
    username: str
    email: str
    phone: str
    token: str
    user: dict[str, Any]

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def unique_phone() -> str:
    return "+849" + str(uuid.uuid4().int)[:9]


def registration(**overrides: Any) -> dict[str, Any]:
    username = unique("gw")
    body = {
        "fullname": "Gateway Tester",
        "email": f"{username}@example.com",
        "username": username,
        "phone": unique_phone(),
        "password": PASSWORD,
        "birthday": "1990-04-01",
    }
    body.update(overrides)
    return body


@pytest.fixture(scope="module")
def client(full_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=full_stack.gateway_url, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def channel(full_stack: Stack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(full_stack.gateway_url.removeprefix("http://")) as grpc_channel:
        yield grpc_channel


def register(client: httpx.Client) -> Account:
    body = registration()
    response = client.post("/auth/register", json=body)
    assert response.status_code == 201, response.text
    answer = response.json()
    return Account(
        body["username"], body["email"], body["phone"], answer["access_token"], answer["user"]
    )


def login(client: httpx.Client, account: str, password: str = PASSWORD) -> dict[str, Any]:
    response = client.post("/auth/login", json={"account": account, "password": password})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def user(client: httpx.Client) -> Account:
    return register(client)


@pytest.fixture(scope="module")
def admin(create_admin: Callable[..., None], client: httpx.Client) -> Account:
    """An admin made with ``cake-auth create-admin``, logged in through the gateway."""
    username = unique("admin")
    email, phone = f"{username}@example.com", unique_phone()
    create_admin(username, email, phone, PASSWORD)
    answer = login(client, username)
    return Account(username, email, phone, answer["access_token"], answer["user"])


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def campaign_body(**overrides: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    body = {
        "name": unique("gateway campaign"),
        "description": "created by tests/e2e/test_gateway_api.py",
        "type": "first_login_discount",
        "startDate": iso(now - timedelta(minutes=1)),
        "endDate": iso(now + timedelta(days=1)),
        "maxParticipants": 1000,
        "discountPercentage": 30,
        "minTopupAmount": 50000,
        "maxDiscountAmount": 20000,
        "voucherValidityDays": 30,
    }
    body.update(overrides)
    return body


@pytest.fixture(scope="module")
def campaign(client: httpx.Client, admin: Account) -> Iterator[dict[str, Any]]:
    """An active first-login campaign, the newest one (so first logins enroll into it)."""
    response = client.post("/promotions/campaigns", json=campaign_body(), headers=admin.auth)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    yield created
    client.patch(
        f"/promotions/campaigns/{created['id']}/status",
        json={"status": "inactive"},
        headers=admin.auth,
    )


def wait_for(fetch: Callable[[], Any], *, what: str, timeout: float = VOUCHER_WAIT_SECONDS) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout}s"
        time.sleep(0.3)


def first_login_voucher(client: httpx.Client, account: Account) -> dict[str, Any]:
    """The voucher the first login earned (issued asynchronously: outbox, relay, Kafka)."""

    def vouchers() -> list[dict[str, Any]]:
        response = client.get("/promotions/my-vouchers", headers=account.auth)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    return wait_for(vouchers, what=f"a voucher for {account.username}")[0]  # type: ignore[no-any-return]


def assert_error(response: httpx.Response, status: int, message: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"code", "message", "details"}
    if message is not None:
        assert body["message"] == message
    assert not [name for name in response.headers if name.startswith("grpc-")]


def violated_fields(response: httpx.Response) -> set[str]:
    fields: set[str] = set()
    for detail in response.json()["details"]:
        if detail["@type"].endswith("google.rpc.BadRequest"):
            fields |= {v["field"] for v in detail["fieldViolations"]}
    return fields


# -- the Cake System's scenarios ----------------------------------------------------------------


def test_campaign_management_with_an_admin_token(
    client: httpx.Client, admin: Account, user: Account
) -> None:
    body = campaign_body(name=unique("managed campaign"), maxParticipants=5)
    created = client.post("/promotions/campaigns", json=body, headers=admin.auth)
    assert created.status_code == 201, created.text
    campaign = created.json()
    try:
        assert campaign["name"] == body["name"]
        assert campaign["status"] == "active"
        assert campaign["maxParticipants"] == 5
        assert campaign["remainingSlots"] == 5
        assert campaign["currentParticipants"] == 0
        assert campaign["discountPercentage"] == 30
        assert campaign["minTopupAmount"] == 50000

        listed = client.get("/promotions/campaigns")
        assert listed.status_code == 200
        assert campaign["id"] in [c["id"] for c in listed.json()]
        assert all(c["status"] == "active" for c in listed.json())
        fetched = client.get(f"/promotions/campaigns/{campaign['id']}")
        assert fetched.status_code == 200
        assert fetched.json()["name"] == body["name"]

        forbidden = client.post("/promotions/campaigns", json=campaign_body(), headers=user.auth)
        assert_error(forbidden, 403)
        anonymous = client.post("/promotions/campaigns", json=campaign_body())
        assert_error(anonymous, 401)
    finally:
        updated = client.patch(
            f"/promotions/campaigns/{campaign['id']}/status",
            json={"status": "inactive"},
            headers=admin.auth,
        )
    assert updated.status_code == 200, updated.text
    assert updated.json()["status"] == "inactive"
    assert campaign["id"] not in [c["id"] for c in client.get("/promotions/campaigns").json()]


def test_registration_and_first_login_earn_a_voucher(
    client: httpx.Client, campaign: dict[str, Any]
) -> None:
    account = register(client)
    assert account.user["username"] == account.username
    assert "latestLogin" not in account.user  # never logged in yet

    answer = login(client, account.email)  # any of username, e-mail or phone
    assert answer["user"]["latestLogin"]
    voucher = first_login_voucher(client, account)

    assert voucher["code"].startswith("CAKE-")
    assert voucher["status"] == "active"
    assert voucher["isValid"] is True
    assert voucher["isExpired"] is False
    assert voucher["discountPercentage"] == campaign["discountPercentage"]
    promotions = client.get("/promotions/my-promotions", headers=account.auth).json()
    assert [p["campaignId"] for p in promotions] == [campaign["id"]]
    assert promotions[0]["status"] == "voucher_issued"
    assert promotions[0]["isInFirstHundred"] is True
    assert promotions[0]["vouchers"][0]["code"] == voucher["code"]


@pytest.fixture(scope="module")
def voucher_owner(client: httpx.Client, campaign: dict[str, Any]) -> tuple[Account, dict[str, Any]]:
    account = register(client)
    login(client, account.username)
    return account, first_login_voucher(client, account)


def test_voucher_validation_is_public(
    client: httpx.Client, voucher_owner: tuple[Account, dict[str, Any]]
) -> None:
    _, voucher = voucher_owner

    response = client.get(f"/promotions/vouchers/{voucher['code']}/validate")

    assert response.status_code == 200
    assert response.json()["code"] == voucher["code"]
    assert response.json()["isValid"] is True


def test_topup_minimum_amount_then_voucher_spent_once(
    client: httpx.Client, voucher_owner: tuple[Account, dict[str, Any]]
) -> None:
    account, voucher = voucher_owner
    minimum = Decimal(str(voucher["minTopupAmount"]))
    request = {"phoneNumber": account.phone, "voucherCode": voucher["code"]}

    too_small = client.post(
        "/promotions/topup", json={**request, "amount": float(minimum - 1)}, headers=account.auth
    )
    assert_error(too_small, 400)
    assert too_small.json()["message"].startswith("Minimum top-up amount for this voucher is ")

    amount = Decimal("100000")
    paid = client.post(
        "/promotions/topup", json={**request, "amount": float(amount)}, headers=account.auth
    )
    assert paid.status_code == 200, paid.text
    receipt = paid.json()
    expected_discount = min(
        amount * Decimal(str(voucher["discountPercentage"])) / 100,
        Decimal(str(voucher["maxDiscountAmount"])) or amount,
    )
    assert receipt["success"] is True
    assert receipt["transactionId"].startswith("TXN-")
    assert Decimal(str(receipt["originalAmount"])) == amount
    assert Decimal(str(receipt["discountAmount"])) == expected_discount
    assert Decimal(str(receipt["finalAmount"])) == amount - expected_discount
    assert receipt["voucherCode"] == voucher["code"]

    reused = client.post(
        "/promotions/topup", json={**request, "amount": float(amount)}, headers=account.auth
    )
    assert_error(reused, 400, "Voucher is expired or already used")
    spent = client.get(f"/promotions/vouchers/{voucher['code']}/validate").json()
    assert spent["status"] == "used"
    assert spent["isValid"] is False


def test_topup_with_an_invalid_or_someone_elses_code(
    client: httpx.Client, user: Account, campaign: dict[str, Any]
) -> None:
    invalid = client.post(
        "/promotions/topup",
        json={"phoneNumber": user.phone, "amount": 60000, "voucherCode": "CAKE-NOPE0000"},
        headers=user.auth,
    )
    assert_error(invalid, 404, "Invalid voucher code")

    other = register(client)
    login(client, other.username)
    their_voucher = first_login_voucher(client, other)
    stolen = client.post(
        "/promotions/topup",
        json={"phoneNumber": user.phone, "amount": 60000, "voucherCode": their_voucher["code"]},
        headers=user.auth,
    )
    assert_error(stolen, 400, "Voucher does not belong to this user")


def test_topup_without_a_voucher_and_an_idempotent_retry(
    client: httpx.Client, user: Account
) -> None:
    headers = {**user.auth, "idempotency-key": str(uuid.uuid4())}
    body = {"phoneNumber": user.phone, "amount": 25000}

    first = client.post("/promotions/topup", json=body, headers=headers)
    retried = client.post("/promotions/topup", json=body, headers=headers)

    assert first.status_code == 200, first.text
    assert first.json()["discountAmount"] == 0
    assert first.json()["finalAmount"] == 25000
    assert retried.status_code == 200
    assert retried.json()["transactionId"] == first.json()["transactionId"]
    assert "idempotent-replayed" not in first.headers
    assert retried.headers["idempotent-replayed"] == "true"


def set_bank_faults(stack: Stack, *rules: payments_pb2.FaultRule) -> None:
    port = stack.service_environment()["payments"]["CAKE_PAYMENTS_GRPC_PORT"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = payments_pb2_grpc.PaymentsServiceStub(channel)
        stub.SetFaults(payments_pb2.SetFaultsRequest(rules=rules), timeout=5)


def test_a_topup_the_bank_does_not_answer_is_pending_and_a_retry_is_told_so(
    client: httpx.Client, user: Account, full_stack: Stack
) -> None:
    headers = {**user.auth, "idempotency-key": str(uuid.uuid4())}
    body = {"phoneNumber": user.phone, "amount": 12345}
    set_bank_faults(full_stack, payments_pb2.FaultRule(fault=payments_pb2.FAULT_HANG))
    try:
        pending = client.post("/promotions/topup", json=body, headers=headers)
        retried = client.post("/promotions/topup", json=body, headers=headers)
    finally:
        set_bank_faults(full_stack)

    assert pending.status_code == 503, pending.text
    assert pending.json()["message"] == (
        "Payment is still being processed; retry with the same Idempotency-Key for the result"
    )
    assert int(pending.headers["retry-after"]) >= 1
    assert retried.status_code == 409, retried.text
    assert retried.json()["message"] == (
        "A top-up with this Idempotency-Key is still being processed; retry later"
    )
    assert int(retried.headers["retry-after"]) >= 1


# -- every route: happy path and documented errors ------------------------------------------------


def test_register_errors(client: httpx.Client, user: Account) -> None:
    invalid = client.post(
        "/auth/register", json=registration(email="not-an-email", username="x", password="123")
    )
    assert_error(invalid, 400)
    assert {"email", "username", "password"} <= violated_fields(invalid)

    for field, message in (
        ("username", "Username already exists"),
        ("email", "Email already exists"),
        ("phone", "Phone number already exists"),
    ):
        taken = {"username": user.username, "email": user.email, "phone": user.phone}[field]
        duplicate = client.post("/auth/register", json=registration(**{field: taken}))
        assert_error(duplicate, 409, message)


def test_login_by_username_email_or_phone_and_bad_credentials(
    client: httpx.Client, user: Account
) -> None:
    for account in (user.username, user.email, user.phone):
        answer = login(client, account)
        assert answer["user"]["id"] == user.user["id"]
        assert answer["access_token"]

    wrong = client.post("/auth/login", json={"account": user.username, "password": "wrong-pw"})
    unknown = client.post("/auth/login", json={"account": unique("nobody"), "password": "x1"})
    assert_error(wrong, 401, "Invalid credentials")
    assert_error(unknown, 401, "Invalid credentials")


def test_profile_read_and_update(client: httpx.Client) -> None:
    account = register(client)
    other = register(client)

    profile = client.get("/auth/profile", headers=account.auth)
    assert profile.status_code == 200
    assert set(profile.json()) >= {"id", "fullname", "email", "username", "phone", "birthday"}
    assert profile.json()["username"] == account.username

    updated = client.patch(
        "/auth/profile", json={"fullname": "Renamed Tester"}, headers=account.auth
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["fullname"] == "Renamed Tester"
    assert updated.json()["email"] == account.email

    assert_error(client.patch("/auth/profile", json={"email": "bad"}, headers=account.auth), 400)
    taken = client.patch("/auth/profile", json={"email": other.email}, headers=account.auth)
    assert_error(taken, 409, "Email already exists")
    assert_error(client.get("/auth/profile"), 401)


def test_refresh_then_logout_revokes_the_token(client: httpx.Client) -> None:
    account = register(client)

    # Cake's form: the bearer token is exchanged once, for a new one and a refresh token.
    refreshed = client.post("/auth/refresh", json={}, headers=account.auth)
    assert refreshed.status_code == 200, refreshed.text
    answer = refreshed.json()
    assert set(answer) == {"access_token", "refresh_token", "expires_in"}
    assert answer["expires_in"] == 900
    fresh = {"authorization": f"Bearer {answer['access_token']}"}
    assert answer["access_token"] != account.token
    # The edge only checks the signature; the services know the token was exchanged.
    assert_error(client.get("/auth/profile", headers=account.auth), 401, "Token has been revoked")
    assert client.get("/auth/profile", headers=fresh).is_success

    logged_out = client.post("/auth/logout", json={}, headers=fresh)
    assert logged_out.status_code == 200
    assert_error(client.get("/auth/profile", headers=fresh), 401)
    assert_error(client.post("/auth/refresh", json={}), 401)
    ended = client.post("/auth/refresh", json={"refresh_token": answer["refresh_token"]})
    assert_error(ended, 401, "Session has ended, please log in again")


def test_jwks_is_public_and_holds_the_signing_key(
    client: httpx.Client, signing_key: SigningKey
) -> None:
    response = client.get("/.well-known/jwks.json")

    assert response.status_code == 200
    assert signing_key.kid in [key["kid"] for key in response.json()["keys"]]


def test_campaign_lookups_and_their_errors(
    client: httpx.Client, admin: Account, campaign: dict[str, Any]
) -> None:
    newest_first = client.get("/promotions/campaigns").json()
    created = [datetime.fromisoformat(c["createdAt"]) for c in newest_first]

    assert created == sorted(created, reverse=True)
    assert_error(client.get("/promotions/campaigns/999999999"), 404, "Campaign not found")
    assert_error(client.get("/promotions/campaigns/not-a-number"), 400)
    missing = client.patch(
        "/promotions/campaigns/999999999/status", json={"status": "inactive"}, headers=admin.auth
    )
    assert_error(missing, 404, "Campaign not found")
    bad_status = client.patch(
        f"/promotions/campaigns/{campaign['id']}/status",
        json={"status": "paused"},
        headers=admin.auth,
    )
    assert_error(bad_status, 400)
    invalid = client.post(
        "/promotions/campaigns", json=campaign_body(name="", maxParticipants=0), headers=admin.auth
    )
    assert_error(invalid, 400)
    # Violations name the proto fields (google.rpc.BadRequest field paths).
    assert {"name", "maxParticipants"} <= violated_fields(invalid)


def test_eligibility_and_track_first_login(client: httpx.Client, campaign: dict[str, Any]) -> None:
    account = register(client)

    eligibility = client.get("/promotions/eligibility", headers=account.auth)
    tracked = client.post("/promotions/track-first-login", json={}, headers=account.auth)
    again = client.post("/promotions/track-first-login", json={}, headers=account.auth)

    # Registered, never logged in, a campaign running with free places: eligible, but the
    # client's call enrolls no one (only auth's first-login event does), twice alike.
    assert eligibility.status_code == 200
    assert eligibility.json()["eligible"] is True
    assert eligibility.json()["message"] == "User is eligible for this campaign"
    assert tracked.status_code == 200, tracked.text
    assert tracked.json()["eligible"] is False
    assert tracked.json()["message"] == (
        "Not enrolled: only a first login while a campaign is active earns its voucher"
    )
    assert (again.status_code, again.json()) == (200, tracked.json())
    assert client.get("/promotions/my-vouchers", headers=account.auth).json() == []
    assert_error(client.get("/promotions/eligibility"), 401)


def test_my_lists_are_bare_arrays(client: httpx.Client, user: Account) -> None:
    for path in ("/promotions/my-promotions", "/promotions/my-vouchers"):
        response = client.get(path, headers=user.auth)
        assert response.status_code == 200
        assert isinstance(response.json(), list)
        assert_error(client.get(path), 401)


def test_unknown_voucher_code(client: httpx.Client) -> None:
    assert_error(
        client.get("/promotions/vouchers/CAKE-NONE0000/validate"), 404, "Voucher not found"
    )


def test_event_admin_routes(client: httpx.Client, admin: Account, user: Account) -> None:
    stats = client.get("/admin/events/queue-stats", headers=admin.auth)
    retried = client.post("/admin/events/retry-failed", json={}, headers=admin.auth)
    letters = client.get("/admin/events/dead-letters", params={"pageSize": 5}, headers=admin.auth)
    replay = client.post(f"/admin/events/{uuid.uuid4()}/replay", json={}, headers=admin.auth)

    assert stats.status_code == 200, stats.text
    for family in ("userEvents", "promotionEvents"):
        assert set(stats.json()[family]) == {"waiting", "active", "completed", "failed"}
    assert retried.status_code == 200
    assert isinstance(retried.json()["retriedCount"], int)
    assert letters.status_code == 200
    assert isinstance(letters.json()["deadLetters"], list)
    assert_error(replay, 404)
    assert_error(client.get("/admin/events/queue-stats", headers=user.auth), 403)
    assert_error(client.get("/admin/events/queue-stats"), 401)


def test_health_and_openapi_are_public(client: httpx.Client) -> None:
    health = client.get("/health")
    document = client.get("/openapi.json")

    assert health.status_code == 200
    assert health.json()["status"] in ("healthy", "degraded")
    assert document.status_code == 200
    assert document.json()["openapi"].startswith("3.")


# -- edge JWT with the stack's keys ---------------------------------------------------------------


def b64url(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def claims(user: Account, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values = {
        "sub": str(user.user["id"]),
        "role": "user",
        "iss": "cake-system",
        "aud": "cake-users",
        "iat": now,
        "exp": now + 600,
        "jti": str(uuid.uuid4()),
        "sid": uuid.uuid4().hex,
    }
    values.update(overrides)
    return values


def bad_tokens(key: SigningKey, user: Account) -> dict[str, str]:
    def sign(payload: dict[str, Any], kid: str = key.kid) -> str:
        return jwt.encode(payload, key.private_key, algorithm="ES256", headers={"kid": kid})

    header, _, signature = user.token.split(".")
    now = int(time.time())
    stranger = ec.generate_private_key(ec.SECP256R1())
    return {
        "expired": sign(claims(user, iat=now - 7200, exp=now - 3600)),
        "tampered": f"{header}.{b64url(claims(user, role='admin'))}.{signature}",
        "alg_none": f"{b64url({'alg': 'none', 'typ': 'JWT', 'kid': key.kid})}."
        f"{b64url(claims(user))}.",
        "wrong_issuer": sign(claims(user, iss="not-cake")),
        "wrong_audience": sign(claims(user, aud="not-cake-users")),
        "unknown_kid": jwt.encode(
            claims(user), stranger, algorithm="ES256", headers={"kid": "unknown-kid"}
        ),
        "forged_with_known_kid": jwt.encode(
            claims(user, role="admin"), stranger, algorithm="ES256", headers={"kid": key.kid}
        ),
    }


TOKEN_CASES = (
    "expired",
    "tampered",
    "alg_none",
    "wrong_issuer",
    "wrong_audience",
    "unknown_kid",
    "forged_with_known_kid",
)


@pytest.mark.parametrize("case", (*TOKEN_CASES, "missing"))
def test_bad_tokens_are_401_over_rest(
    client: httpx.Client, signing_key: SigningKey, user: Account, case: str
) -> None:
    headers = (
        {}
        if case == "missing"
        else {"authorization": f"Bearer {bad_tokens(signing_key, user)[case]}"}
    )

    response = client.get("/auth/profile", headers=headers)

    assert_error(response, 401)
    assert response.json()["code"] == 16


@pytest.mark.parametrize("case", (*TOKEN_CASES, "missing"))
def test_bad_tokens_are_unauthenticated_over_native_grpc(
    channel: grpc.Channel, signing_key: SigningKey, user: Account, case: str
) -> None:
    stub = promotions_pb2_grpc.PromotionsServiceStub(channel)
    token = None if case == "missing" else bad_tokens(signing_key, user)[case]
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)

    with pytest.raises(grpc.RpcError) as failure:
        stub.ListMyVouchers(promotions_pb2.ListMyVouchersRequest(), metadata=metadata, timeout=10)

    assert failure.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_a_token_signed_with_the_stack_key_works_over_rest_and_grpc(
    client: httpx.Client, channel: grpc.Channel, signing_key: SigningKey, user: Account
) -> None:
    token = jwt.encode(
        claims(user), signing_key.private_key, algorithm="ES256", headers={"kid": signing_key.kid}
    )
    metadata = (("authorization", f"Bearer {token}"),)

    rest = client.get("/auth/profile", headers={"authorization": f"Bearer {token}"})
    native = auth_pb2_grpc.AuthServiceStub(channel).GetProfile(
        auth_pb2.GetProfileRequest(), metadata=metadata, timeout=10
    )

    assert rest.json()["username"] == user.username
    assert native.user.username == user.username


def test_forged_claim_headers_are_ignored(
    client: httpx.Client, user: Account, admin: Account
) -> None:
    forged = {
        "x-cake-user-id": str(admin.user["id"]),
        "x-cake-user-role": "admin",
        "x-cake-jwt-payload": b64url({"sub": str(admin.user["id"]), "role": "admin"}),
        "x-cake-client-ip": "203.0.113.50",
    }

    as_user = client.get("/auth/profile", headers={**forged, **user.auth})
    anonymous = client.get("/auth/profile", headers=forged)
    admin_only = client.get("/admin/events/queue-stats", headers={**forged, **user.auth})

    assert as_user.json()["username"] == user.username
    assert_error(anonymous, 401)
    assert_error(admin_only, 403)


# -- bad requests through the real gateway ---------------------------------------------------------


def test_bad_requests_get_json_errors(client: httpx.Client, user: Account) -> None:
    too_large = client.post("/auth/register", content=b'{"fullname": "' + b"x" * (2 << 20) + b'"}')
    malformed = client.post(
        "/auth/login", content=b'{"account": "a", ', headers={"content-type": "application/json"}
    )
    unknown_query = client.get("/promotions/campaigns", params={"limit": 10})
    unknown_path = client.get("/promotions/nothing-here")
    unknown_field = client.post(
        "/promotions/topup",
        json={"phoneNumber": user.phone, "amount": 10, "voucher_cde": "CAKE-AAAA0000"},
        headers=user.auth,
    )

    assert_error(too_large, 413, "Payload Too Large")
    assert_error(malformed, 400)
    assert_error(unknown_query, 400)
    assert_error(unknown_path, 404, "Cannot GET /promotions/nothing-here")
    assert_error(unknown_field, 400, "property voucher_cde should not exist")
    assert violated_fields(unknown_field) == {"voucher_cde"}
