"""Voucher and payment events through real Kafka, PostgreSQL, auth (contacts over gRPC) and
an SMTP sink process: one e-mail and one in-app entry per event whatever the redeliveries,
poison events dead-lettered, and an SMTP outage of several seconds during a burst loses and
doubles nothing."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer
from cake.auth.v1 import auth_pb2_grpc, oauth_pb2
from cake.events.v1 import envelope_pb2, payloads_pb2, registry
from cake.notifications.v1 import notifications_pb2
from cake_common.db import create_async_engine_for
from cake_common.kafka import create_producer, ensure_topics, start_with_retry
from cake_notifications.adapters.contacts import GrpcContactDirectory
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

pytestmark = pytest.mark.integration


def ts(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def envelope(kind: str, user_id: int, payload: Message, event_id: str | None = None) -> bytes:
    packed = AnyMessage()
    packed.Pack(payload)
    return envelope_pb2.EventEnvelope(
        event_id=event_id or str(uuid.uuid4()),
        type=kind,
        occurred_at=ts(datetime.now(UTC)),
        aggregate_type="user",
        aggregate_id=str(user_id),
        payload=packed,
    ).SerializeToString()


def voucher_issued(
    user_id: int, code: str, event_id: str | None = None, issued_at: datetime | None = None
) -> bytes:
    now = issued_at or datetime.now(UTC)
    return envelope(
        registry.VOUCHER_ISSUED.name,
        user_id,
        payloads_pb2.VoucherIssued(
            voucher_id=1,
            code=code,
            user_id=user_id,
            campaign_id=1,
            discount_percentage="30.00",
            expires_at=ts(now + timedelta(days=30)),
            issued_at=ts(now),
        ),
        event_id,
    )


def payment(user_id: int, transaction_id: str, status: int) -> bytes:
    return envelope(
        registry.PAYMENT_PROCESSED.name,
        user_id,
        payloads_pb2.PaymentProcessed(
            transaction_id=transaction_id,
            user_id=user_id,
            phone_number="0900000000",
            original_amount="100.00",
            discount_amount="30.00",
            final_amount="70.00",
            voucher_code="CAKE-ABCDEFGH",
            success=status == payloads_pb2.PAYMENT_STATUS_SUCCEEDED,
            processed_at=ts(datetime.now(UTC)),
            status=status,  # type: ignore[arg-type]
        ),
    )


def code() -> str:
    return "CAKE-" + uuid.uuid4().hex[:8].upper()


@pytest.fixture(scope="module")
async def topics(kafka_bootstrap: str) -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    vouchers, payments = f"test.notif.voucher.{tag}", f"test.notif.payment.{tag}"
    await ensure_topics(
        kafka_bootstrap, {vouchers: 3, f"{vouchers}.dlq": 1, payments: 3, f"{payments}.dlq": 1}
    )
    return {
        registry.VOUCHER_ISSUED.name: vouchers,
        registry.VOUCHER_USED.name: vouchers,
        registry.PAYMENT_PROCESSED.name: payments,
    }


@pytest.fixture(scope="module")
async def producer(kafka_bootstrap: str) -> AsyncIterator[Any]:
    client = await start_with_retry(
        lambda: create_producer(kafka_bootstrap, "test-notifications"), timeout_seconds=30
    )
    yield client
    await client.stop()


@pytest.fixture(scope="module")
async def notifications(start_notifications: Any, topics: dict[str, str]) -> Any:
    return await start_notifications(topics)


async def publish(producer: Any, topic: str, user_id: int, value: bytes) -> None:
    await producer.send_and_wait(topic, value=value, key=str(user_id).encode())


async def test_a_voucher_becomes_one_email_and_one_entry_whatever_the_redeliveries(
    auth: Any,
    notifications: Any,
    smtp_sink: Any,
    producer: Any,
    topics: dict[str, str],
    wait_for: Any,
) -> None:
    user = await auth.register()
    voucher = code()
    event_id = str(uuid.uuid4())
    topic = topics[registry.VOUCHER_ISSUED.name]
    for _ in range(3):  # the same event, redelivered
        await publish(producer, topic, user.id, voucher_issued(user.id, voucher, event_id))
    [email] = await wait_for(lambda: smtp_sink.to(user.email), "the voucher e-mail")
    assert voucher in email["Subject"]
    assert f"Xin chào {user.fullname}," in email.get_content()
    metadata = (("authorization", f"Bearer {auth.token(user.id)}"),)
    listed = await notifications.stub.ListNotifications(
        notifications_pb2.ListNotificationsRequest(), metadata=metadata
    )
    assert [n.kind for n in listed.notifications] == ["VOUCHER_ISSUED"]
    assert listed.unread_count == 1
    await asyncio.sleep(1.5)  # anything repeated would have arrived by now
    assert len(smtp_sink.to(user.email)) == 1
    # Handed over by the consumer's commit: each channel sent at its first attempt, with
    # its own time; SMS and push recorded once each.
    engine = create_async_engine_for(notifications.settings.database_url, pool_size=1)
    try:
        async with engine.connect() as connection:
            sent = (
                await connection.execute(
                    sa.text(
                        "SELECT d.channel, d.status, d.attempts, d.sent_at IS NOT NULL,"
                        " r.recipient FROM deliveries d JOIN notifications n"
                        " ON n.id = d.notification_id LEFT JOIN recorded_messages r"
                        " ON r.delivery_id = d.id WHERE n.event_id = :event_id"
                        " ORDER BY d.channel"
                    ),
                    {"event_id": uuid.UUID(event_id)},
                )
            ).all()
    finally:
        await engine.dispose()
    assert [tuple(row) for row in sent] == [
        ("email", "sent", 1, True, None),
        ("push", "sent", 1, True, user.phone),
        ("sms", "sent", 1, True, user.phone),
    ]
    assert (
        notifications.counter("cake_notifications_consumed_events_total", result="duplicate") >= 2
    )

    # A top-up: the pending event is not notified, the resolved one is the second e-mail.
    payments = topics[registry.PAYMENT_PROCESSED.name]
    await publish(producer, payments, user.id, payment(user.id, "TXN-1-aaaaaa", 1))
    await publish(producer, payments, user.id, payment(user.id, "TXN-1-aaaaaa", 2))
    receipts = await wait_for(
        lambda: [m for m in smtp_sink.to(user.email) if "TXN-1-aaaaaa" in m["Subject"]],
        "the receipt",
    )
    assert len(receipts) == 1
    listed = await notifications.stub.ListNotifications(
        notifications_pb2.ListNotificationsRequest(page_size=1), metadata=metadata
    )
    assert [n.kind for n in listed.notifications] == ["PAYMENT_PROCESSED"]
    assert listed.unread_count == 2 and listed.next_page_token

    # Read it; the count drops; someone else cannot read it.
    read = await notifications.stub.MarkNotificationRead(
        notifications_pb2.MarkNotificationReadRequest(id=listed.notifications[0].id),
        metadata=metadata,
    )
    assert read.notification.read
    other = await auth.register()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await notifications.stub.MarkNotificationRead(
            notifications_pb2.MarkNotificationReadRequest(id=listed.notifications[0].id),
            metadata=(("authorization", f"Bearer {auth.token(other.id)}"),),
        )
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


async def test_opting_out_of_email_is_honoured(
    auth: Any,
    notifications: Any,
    smtp_sink: Any,
    producer: Any,
    topics: dict[str, str],
    wait_for: Any,
) -> None:
    user = await auth.register()
    metadata = (("authorization", f"Bearer {auth.token(user.id)}"),)
    updated = await notifications.stub.UpdateNotificationPreferences(
        notifications_pb2.UpdateNotificationPreferencesRequest(email=False, language="en"),
        metadata=metadata,
    )
    assert (updated.preferences.email, updated.preferences.sms) == (False, True)
    await publish(
        producer, topics[registry.VOUCHER_ISSUED.name], user.id, voucher_issued(user.id, code())
    )

    async def entries() -> Any:
        listed = await notifications.stub.ListNotifications(
            notifications_pb2.ListNotificationsRequest(), metadata=metadata
        )
        return listed if listed.notifications else None

    listed = await wait_for(entries, "the in-app entry")
    assert listed.notifications[0].title.startswith("Your voucher")
    assert notifications_pb2.CHANNEL_EMAIL not in listed.notifications[0].channels
    await asyncio.sleep(1.0)
    assert smtp_sink.to(user.email) == []


async def test_old_events_and_users_without_contacts_are_skipped_not_failed(
    auth: Any,
    notifications: Any,
    smtp_sink: Any,
    producer: Any,
    topics: dict[str, str],
    wait_for: Any,
) -> None:
    """A topic's history replayed (a voucher issued 30 days ago) notifies nobody; a user auth
    does not know has nowhere to be reached: skipped and counted, never failed or retried."""
    user = await auth.register()
    old, new = code(), code()
    topic = topics[registry.VOUCHER_ISSUED.name]
    long_ago = datetime.now(UTC) - timedelta(days=30)
    await publish(producer, topic, user.id, voucher_issued(user.id, old, issued_at=long_ago))
    await publish(producer, topic, user.id, voucher_issued(user.id, new))
    ghost = 10**12 + uuid.uuid4().int % 10**6  # no such user in auth
    await publish(producer, topic, ghost, voucher_issued(ghost, code()))

    [email] = await wait_for(lambda: smtp_sink.to(user.email), "the fresh voucher's e-mail")
    assert new in email["Subject"]
    skipped = "cake_notifications_deliveries_skipped_total"
    for channel in ("email", "sms", "push"):
        await wait_for(
            lambda channel=channel: (
                notifications.counter(skipped, channel=channel, reason="unknown_user") >= 1
            ),
            f"the unknown user's {channel} delivery skipped",
        )
    assert notifications.counter("cake_notifications_events_too_old_total", kind="voucher_issued")
    assert notifications.counter("cake_notifications_consumed_events_total", result="too_old")
    for channel in ("email", "sms", "push"):
        assert not notifications.counter("cake_notifications_send_failures_total", channel=channel)
        assert not notifications.counter("cake_notifications_send_retries_total", channel=channel)
    listed = await notifications.stub.ListNotifications(
        notifications_pb2.ListNotificationsRequest(),
        metadata=(("authorization", f"Bearer {auth.token(user.id)}"),),
    )
    assert [entry.title for entry in listed.notifications if old in entry.title] == []
    assert len(listed.notifications) == 1
    await asyncio.sleep(1.0)  # a late e-mail for the old voucher would have landed
    assert [m["Subject"] for m in smtp_sink.to(user.email)] == [email["Subject"]]


async def test_bad_input_is_refused_clearly(auth: Any, notifications: Any) -> None:
    metadata = (("authorization", f"Bearer {auth.token(12345)}"),)
    cases = [
        notifications.stub.ListNotifications(
            notifications_pb2.ListNotificationsRequest(page_token="not-ours"), metadata=metadata
        ),
        notifications.stub.ListNotifications(
            notifications_pb2.ListNotificationsRequest(page_size=1000), metadata=metadata
        ),
        notifications.stub.MarkNotificationRead(
            notifications_pb2.MarkNotificationReadRequest(id="42"), metadata=metadata
        ),
        notifications.stub.UpdateNotificationPreferences(
            notifications_pb2.UpdateNotificationPreferencesRequest(language="fr"),
            metadata=metadata,
        ),
    ]
    for call in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await notifications.stub.ListNotifications(notifications_pb2.ListNotificationsRequest())
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_an_event_breaking_its_contract_is_dead_lettered(
    notifications: Any, producer: Any, topics: dict[str, str], kafka_bootstrap: str
) -> None:
    topic = topics[registry.VOUCHER_ISSUED.name]
    bad = voucher_issued(5, "not-a-code")
    await producer.send_and_wait(topic, value=bad, key=b"5")
    consumer = AIOKafkaConsumer(
        registry.dead_letter_topic_for(topic),
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + 30
        found = []
        while not found and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=1000)
            found = [r for records in batches.values() for r in records if r.value == bad]
    finally:
        await consumer.stop()
    assert found, "the poison event never reached the dead-letter topic"
    reason = dict(found[0].headers)[registry.DEAD_LETTER_REASON_HEADER].decode()
    assert reason.startswith("invalid_payload")


async def test_smtp_down_during_a_burst_every_email_arrives_exactly_once(
    auth: Any,
    notifications: Any,
    smtp_sink: Any,
    producer: Any,
    topics: dict[str, str],
    wait_for: Any,
) -> None:
    users = [await auth.register() for _ in range(20)]
    topic = topics[registry.VOUCHER_ISSUED.name]
    smtp_sink.stop()
    codes = {}
    for user in users:
        codes[user.email] = code()
        await publish(producer, topic, user.id, voucher_issued(user.id, codes[user.email]))
    await asyncio.sleep(10)  # the burst lands while the server is down (10 s, as the drill)
    retries = notifications.counter("cake_notifications_send_retries_total", channel="email")
    assert retries > 0
    assert all(smtp_sink.to(u.email) == [] for u in users)
    smtp_sink.start()
    await wait_for(
        lambda: all(smtp_sink.to(u.email) for u in users), "every e-mail after the outage", 60
    )
    await asyncio.sleep(2)
    for user in users:
        [email] = smtp_sink.to(user.email)
        assert codes[user.email] in email["Subject"]
    ids = [m["Message-ID"] for m in smtp_sink.messages()]
    assert len(ids) == len(set(ids))


async def test_contacts_asked_for_together_go_to_auth_in_one_call(auth: Any) -> None:
    users = [await auth.register() for _ in range(3)]

    async def admin_token(_stub: Any) -> str:
        return str(auth.token(users[0].id, "admin"))

    directory = GrpcContactDirectory(f"127.0.0.1:{auth.running.port}", admin_token)
    calls: list[str] = []
    stub = directory._stub

    class CountingStub:
        def __getattr__(self, name: str) -> Any:
            calls.append(name)
            return getattr(stub, name)

    directory._stub = CountingStub()  # type: ignore[assignment]
    unknown = 9_000_000_000_000
    try:
        found = await asyncio.gather(
            *(directory.contacts(user.id) for user in users),
            directory.contacts(unknown),
            directory.contacts(users[0].id),  # asked twice: asked for once
        )
        again = await directory.contacts(users[1].id)  # cached: no call
    finally:
        await directory.close()
    assert calls == ["GetUsersContacts"]
    assert [(c.user_id, c.email) for c in found[:3] if c] == [(u.id, u.email) for u in users]
    assert found[3] is None and found[4] == found[0] and again == found[1]


async def test_an_auth_without_the_batch_call_is_asked_one_user_at_a_time() -> None:
    """During a rolling deployment notifications may meet an auth that only has
    GetUserContacts: a gRPC server answering UNIMPLEMENTED for GetUsersContacts."""

    class OlderAuth(auth_pb2_grpc.AuthServiceServicer):
        async def GetUserContacts(
            self, request: oauth_pb2.GetUserContactsRequest, context: Any
        ) -> oauth_pb2.GetUserContactsResponse:
            if request.user_id == 404:
                await context.abort(grpc.StatusCode.NOT_FOUND, "User not found")
            return oauth_pb2.GetUserContactsResponse(
                user_id=request.user_id, email=f"u{request.user_id}@example.com"
            )

    server = grpc.aio.server()
    auth_pb2_grpc.add_AuthServiceServicer_to_server(OlderAuth(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    async def token(_stub: Any) -> str:
        return "any"

    directory = GrpcContactDirectory(f"127.0.0.1:{port}", token)
    try:
        found = await asyncio.gather(*(directory.contacts(u) for u in (7, 404, 8)))
        later = await directory.contacts(9)
    finally:
        await directory.close()
        await server.stop(None)
    assert [c.email if c else None for c in found] == ["u7@example.com", None, "u8@example.com"]
    assert later is not None and later.email == "u9@example.com"
