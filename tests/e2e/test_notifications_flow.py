"""End-to-end: register → first login → voucher → an e-mail in the stack's SMTP sink and an
entry in ``GET /notifications``; a top-up → the receipt e-mail; markRead, opting out and bad
input, all through the gateway (REST, JWT, limits) against the real stack.

register/login (auth) → USER_FIRST_LOGIN → relay → Kafka → promotions (voucher + outbox
VOUCHER_ISSUED) → relay → Kafka → notifications (inbox, deliveries) → SMTP sink.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy
from typing import Any, cast

import httpx
import pytest
from cake_devtools.stack import Stack

pytestmark = pytest.mark.e2e

PASSWORD = "s3cret-pass"
WAIT_SECONDS = 60


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def wait_for(fetch: Callable[[], Any], what: str, timeout: float = WAIT_SECONDS) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout}s"
        time.sleep(0.3)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture(scope="module")
def client(full_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=full_stack.gateway_url, timeout=30) as http:
        yield http


def mails_to(stack: Stack, address: str) -> list[EmailMessage]:
    found = []
    for path in sorted(stack.mail_dir.glob("*.eml")):
        message = cast(EmailMessage, message_from_bytes(path.read_bytes(), policy=default_policy))
        if message["To"] == address:
            found.append(message)
    return found


@dataclass
class NewUser:
    username: str
    email: str
    phone: str
    headers: dict[str, str]


def register(client: httpx.Client) -> NewUser:
    """A new account (its token from the registration); no login yet."""
    username = unique("notif")
    body = {
        "fullname": "Notified Tester",
        "email": f"{username}@example.com",
        "username": username,
        "phone": "+849" + str(uuid.uuid4().int)[:9],
        "password": PASSWORD,
        "birthday": "1990-04-01",
    }
    registered = client.post("/auth/register", json=body)
    assert registered.status_code == 201, registered.text
    token = registered.json()["access_token"]
    return NewUser(username, body["email"], body["phone"], {"authorization": f"Bearer {token}"})


def first_login(client: httpx.Client, user: NewUser) -> None:
    login = client.post("/auth/login", json={"account": user.username, "password": PASSWORD})
    assert login.status_code == 200, login.text


@pytest.fixture(scope="module")
def campaign(client: httpx.Client, create_admin: Callable[..., None]) -> Iterator[None]:
    username = unique("nadmin")
    create_admin(username, f"{username}@example.com", "+849" + str(uuid.uuid4().int)[:9], PASSWORD)
    token = client.post("/auth/login", json={"account": username, "password": PASSWORD}).json()[
        "access_token"
    ]
    admin = {"authorization": f"Bearer {token}"}
    now = datetime.now(UTC)
    created = client.post(
        "/promotions/campaigns",
        json={
            "name": unique("notifications campaign"),
            "startDate": iso(now - timedelta(minutes=1)),
            "endDate": iso(now + timedelta(days=1)),
            "maxParticipants": 1000,
            "discountPercentage": 30,
        },
        headers=admin,
    )
    assert created.status_code == 201, created.text
    yield
    client.patch(
        f"/promotions/campaigns/{created.json()['id']}/status",
        json={"status": "inactive"},
        headers=admin,
    )


def notifications(client: httpx.Client, user: dict[str, str], **params: Any) -> dict[str, Any]:
    response = client.get("/notifications", params=params, headers=user)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_voucher_then_topup_each_send_one_email_and_list_in_the_app(
    client: httpx.Client, full_stack: Stack, campaign: None
) -> None:
    account = register(client)
    first_login(client, account)
    user, email, phone = account.headers, account.email, account.phone
    [welcome] = wait_for(lambda: mails_to(full_stack, email), "the voucher e-mail")
    vouchers = client.get("/promotions/my-vouchers", headers=user).json()
    code = vouchers[0]["code"]
    assert code in welcome["Subject"]
    listed = wait_for(lambda: notifications(client, user).get("notifications"), "the in-app entry")
    assert [n["kind"] for n in listed] == ["VOUCHER_ISSUED"]
    assert code in listed[0]["title"]

    paid = client.post(
        "/promotions/topup",
        json={"phoneNumber": phone, "amount": 100000, "voucherCode": code},
        headers=user,
    )
    assert paid.status_code == 200, paid.text
    transaction = paid.json()["transactionId"]
    wait_for(lambda: len(mails_to(full_stack, email)) == 2, "the receipt e-mail")
    receipt = mails_to(full_stack, email)
    assert sum(transaction in m["Subject"] for m in receipt) == 1
    page = wait_for(
        lambda: (p := notifications(client, user)) and len(p["notifications"]) == 3 and p,
        "the top-up's entries",
    )
    assert sorted(n["kind"] for n in page["notifications"]) == [
        "PAYMENT_PROCESSED",
        "VOUCHER_ISSUED",
        "VOUCHER_USED",
    ]
    assert int(page["unreadCount"]) == 3

    # Pages of one, newest first, and markRead.
    first = notifications(client, user, pageSize=1)
    assert len(first["notifications"]) == 1 and first["nextPageToken"]
    second = notifications(client, user, pageSize=1, pageToken=first["nextPageToken"])
    assert second["notifications"][0]["id"] != first["notifications"][0]["id"]
    read = client.post(
        f"/notifications/{first['notifications'][0]['id']}:markRead", json={}, headers=user
    )
    assert read.status_code == 200, read.text
    assert read.json()["read"] is True
    assert int(notifications(client, user)["unreadCount"]) == 2
    time.sleep(1)
    assert len(mails_to(full_stack, email)) == 2  # nothing sent twice


def test_opting_out_of_email_is_honoured(
    client: httpx.Client, full_stack: Stack, campaign: None
) -> None:
    account = register(client)
    changed = client.patch(
        "/notifications/preferences", json={"email": False}, headers=account.headers
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["email"] is False
    got = client.get("/notifications/preferences", headers=account.headers).json()
    assert (got["email"], got["sms"], got["push"], got["language"]) == (False, True, True, "vi")
    first_login(client, account)
    [entry] = wait_for(
        lambda: notifications(client, account.headers)["notifications"], "the in-app entry"
    )
    assert entry["kind"] == "VOUCHER_ISSUED"
    assert "CHANNEL_EMAIL" not in entry["channels"]
    time.sleep(2)
    assert mails_to(full_stack, account.email) == []


def test_bad_input_gets_400_with_a_clear_message(client: httpx.Client) -> None:
    user = register(client).headers
    cases = [
        client.get("/notifications", params={"pageToken": "garbage"}, headers=user),
        client.get("/notifications", params={"pageSize": 1000}, headers=user),
        client.post("/notifications/not-a-uuid:markRead", json={}, headers=user),
        client.patch("/notifications/preferences", json={"language": "fr"}, headers=user),
        client.patch("/notifications/preferences", json={"email": "maybe"}, headers=user),
    ]
    for response in cases:
        assert response.status_code == 400, response.text
        assert response.json()["message"], response.text
    missing = client.post(f"/notifications/{uuid.uuid4()}:markRead", json={}, headers=user)
    assert missing.status_code == 404, missing.text
    assert missing.json()["message"] == "Notification not found"
    anonymous = client.get("/notifications")
    assert anonymous.status_code == 401, anonymous.text
