"""End-to-end on the real cluster, through the in-cluster gateway: health, a new user's first
login earning a voucher through the relay and Kafka, the voucher paying for a top-up (charged
at the bank simulator), the
admin's queue statistics, the API document, and a native gRPC call through the same port.

Everything here runs under the gateway's real rate limits (Cake's 100/min per address,
20/min for credentials); the drills that need more traffic lift them afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from decimal import Decimal
from typing import Any

import grpc
import httpx
import jwt
from cake.auth.v1 import auth_pb2, auth_pb2_grpc
from cake_devtools.cluster_client import PASSWORD, Account, CakeClient
from cake_devtools.k8s_deploy import Kubectl

VOUCHER_WAIT_SECONDS = 60
NOTIFICATION_WAIT_SECONDS = 60
HEALTH_WAIT_SECONDS = 60


def test_health_reports_every_service_serving(http: httpx.Client) -> None:
    # Right after a deploy the health report's first calls open their connections: wait
    # (bounded) for the first healthy answer, then check every component in it.
    deadline = time.monotonic() + HEALTH_WAIT_SECONDS
    response = http.get("/health")
    while response.status_code != 200 and time.monotonic() < deadline:
        time.sleep(1)
        response = http.get("/health")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "healthy", body
    for component in (
        *("auth", "promotions", "notifications", "events"),
        *("auth_database", "promotions_database", "notifications_database", "events_database"),
        *("redis", "kafka"),
    ):
        assert body["checks"][component] == "healthy", (component, body)


def test_first_login_voucher_pays_for_a_topup(
    client: CakeClient, admin: Account, record: Any, sql: Any
) -> None:
    campaign = client.create_campaign(admin, 100, f"k8s e2e {uuid.uuid4().hex[:6]}")
    try:
        user = client.register("k8s_e2e")
        login = client.login(user.username)
        assert login["user"]["username"] == user.username
        user = Account(user.user_id, user.username, user.password, login["access_token"])

        voucher = client.wait_for_voucher(user, VOUCHER_WAIT_SECONDS)
        assert voucher["status"] == "active", voucher
        assert Decimal(str(voucher["discountPercentage"])) == 30, voucher

        amount = 100000
        body = {"phoneNumber": client.new_phone(), "amount": amount, "voucherCode": voucher["code"]}
        headers = {**user.headers, "idempotency-key": f"k8s-e2e-{uuid.uuid4()}"}
        topup = client.expect(
            client.http.post("/promotions/topup", json=body, headers=headers), 200
        )
        # 30 % of 100 000 is 30 000, capped by the campaign's maximum discount of 20 000.
        assert Decimal(str(topup["discountAmount"])) == 20000, topup
        assert Decimal(str(topup["finalAmount"])) == 80000, topup

        replay = client.http.post("/promotions/topup", json=body, headers=headers)
        assert replay.status_code == 200, replay.text
        assert replay.json()["transactionId"] == topup["transactionId"]
        assert replay.headers.get("idempotent-replayed") == "true"

        # Charged once, at the bank simulator's own ledger (its own pod and database).
        charges = sql(
            "cake_payments",
            f"SELECT status, amount FROM ledger WHERE transaction_id = '{topup['transactionId']}'",
        )
        assert charges == [("charged", "80000.00")], charges

        after = client.my_vouchers(user)
        assert [(v["code"], v["status"]) for v in after] == [(voucher["code"], "used")]

        # The notifications service (its own pod and database, the SMTP sink's pod): the
        # voucher, its use and the receipt in the user's list, and the two e-mails (the
        # voucher's and the receipt's) handed to the SMTP server exactly once each.
        page = _wait_for_notifications(client, user, 3)
        assert sorted(n["kind"] for n in page["notifications"]) == [
            "PAYMENT_PROCESSED",
            "VOUCHER_ISSUED",
            "VOUCHER_USED",
        ], page
        assert int(page["unreadCount"]) == 3, page
        deadline = time.monotonic() + NOTIFICATION_WAIT_SECONDS
        while True:
            mails = sql(
                "cake_notifications",
                "SELECT n.kind, d.status FROM deliveries d JOIN notifications n "
                f"ON n.id = d.notification_id WHERE n.user_id = {user.user_id} "
                "AND d.channel = 'email' ORDER BY n.kind",
            )
            if all(status == "sent" for _, status in mails) and len(mails) == 2:
                break
            assert time.monotonic() < deadline, mails
            time.sleep(1)
        assert mails == [("payment_processed", "sent"), ("voucher_issued", "sent")], mails
    finally:
        client.end_campaign(admin, campaign)
    record("end_to_end", {"first_login_to_topup": "ok"})


def test_notifications_calls_auth_with_its_service_account(
    http: httpx.Client, kubectl: Kubectl, sql: Any
) -> None:
    """The e-mails above needed the users' contacts from auth, which only a token with scope
    users:read-contacts gets. Notifications has no token of its own: it holds the client
    secret of the Secret notifications-auth-client, which the auth-service-accounts Job
    registered, and requests 5-minute service tokens with it (client credentials)."""
    encoded = kubectl.run(
        "get", "secret", "notifications-auth-client", "-o", "jsonpath={.data.client-secret}"
    ).stdout
    secret = base64.b64decode(encoded).decode().strip()
    # The account in auth's database: enabled, its scope, and the Secret's secret.
    accounts = sql(
        "cake_auth",
        "SELECT array_to_string(scopes, ' '), disabled_at IS NULL, secret_hash "
        "FROM service_accounts WHERE client_id = 'notifications'",
    )
    assert accounts == [("users:read-contacts", "t", hashlib.sha256(secret.encode()).hexdigest())]
    # That secret is what gets notifications a token: a service-role client-credentials
    # token, short-lived, for that scope only.
    response = http.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "scope": "users:read-contacts"},
        auth=("notifications", secret),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["expires_in"] == 300, body
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert (claims["role"], claims["sub"], claims["scope"]) == (
        "service",
        "notifications",
        "users:read-contacts",
    )
    # And nothing else authenticates notifications: no token in its pod's environment or
    # volumes, only the client id and the secret file.
    deployment = kubectl.get_json("deployment/notifications")
    pod = deployment["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    names = {variable["name"] for variable in server["env"]}
    assert "CAKE_NOTIFICATIONS_AUTH_CLIENT_ID" in names
    assert not [name for name in names if "TOKEN" in name], names
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"notifications-auth-client"}, secrets


def _wait_for_notifications(client: CakeClient, user: Account, count: int) -> dict[str, Any]:
    deadline = time.monotonic() + NOTIFICATION_WAIT_SECONDS
    while True:
        response = client.http.get("/notifications", headers=user.headers)
        assert response.status_code == 200, response.text
        page: dict[str, Any] = response.json()
        if len(page.get("notifications", [])) >= count:
            return page
        assert time.monotonic() < deadline, page
        time.sleep(0.5)


def test_admin_queue_stats_need_the_admin_role(
    client: CakeClient, admin: Account, http: httpx.Client
) -> None:
    stats = http.get("/admin/events/queue-stats", headers=admin.headers)
    assert stats.status_code == 200, stats.text
    assert isinstance(stats.json(), dict) and stats.json(), stats.text

    user = client.register("k8s_user")
    assert http.get("/admin/events/queue-stats", headers=user.headers).status_code == 403
    assert http.get("/admin/events/queue-stats").status_code == 401


def test_openapi_document_is_served(http: httpx.Client) -> None:
    response = http.get("/openapi.json")
    assert response.status_code == 200
    assert "/auth/login" in response.json()["paths"]


def test_native_grpc_through_the_gateway(gateway_url: str, client: CakeClient) -> None:
    user = client.register("k8s_grpc")
    with grpc.insecure_channel(gateway_url.removeprefix("http://")) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        answer = stub.Login(
            auth_pb2.LoginRequest(account=user.username, password=PASSWORD), timeout=10
        )
        assert answer.access_token
        assert str(answer.user.id) == user.user_id
        try:
            stub.Login(auth_pb2.LoginRequest(account=user.username, password="wrong"), timeout=10)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        else:
            raise AssertionError("a wrong password logged in over gRPC")
