"""Unit tests of the relay's pure rules: routing, envelopes, retries, order, page tokens."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime

import pytest
from cake.events.v1 import envelope_pb2, payloads_pb2
from cake_common.retry import RetryPolicy
from cake_events.domain.delivery import DeadLetterCursor, InvalidPageTokenError
from cake_events.domain.envelope import EnvelopeBuilder
from cake_events.domain.relay import (
    DEFAULT_TOPIC_ROUTES,
    AggregateOrder,
    FailurePolicy,
    OutboxEvent,
    PoisonEvent,
    TopicRoutes,
    error_text,
    overtaken_aggregates,
)
from cake_events.settings import EventsSettings
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

OCCURRED = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def outbox_event(
    row_id: int = 1,
    *,
    aggregate_id: str = "7",
    event_type: str = "USER_FIRST_LOGIN",
    payload: bytes | None = None,
    payload_type: str = "cake.events.v1.UserFirstLogin",
    attempts: int = 0,
    trace_parent: str | None = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
) -> OutboxEvent:
    if payload is None:
        login_at = Timestamp()
        login_at.FromDatetime(OCCURRED)
        payload = payloads_pb2.UserFirstLogin(user_id=7, login_at=login_at).SerializeToString()
    return OutboxEvent(
        id=row_id,
        event_id=str(uuid.uuid4()),
        event_type=event_type,
        aggregate_type="user",
        aggregate_id=aggregate_id,
        payload=payload,
        payload_type=payload_type,
        occurred_at=OCCURRED,
        trace_parent=trace_parent,
        attempts=attempts,
    )


ROUTES = TopicRoutes(DEFAULT_TOPIC_ROUTES)


def test_every_event_type_has_a_default_route_and_dead_letter_topic() -> None:
    assert ROUTES.topic_for("USER_FIRST_LOGIN") == "cake.auth.user.v1"
    assert ROUTES.topic_for("VOUCHER_USED") == "cake.promotions.voucher.v1"
    assert ROUTES.topic_for("PAYMENT_PROCESSED") == "cake.promotions.payment.v1"
    assert ROUTES.dead_letter_topic("cake.auth.user.v1") == "cake.auth.user.v1.dlq"


def test_an_event_type_without_route_is_poison() -> None:
    with pytest.raises(PoisonEvent, match="no topic route"):
        TopicRoutes({"USER_FIRST_LOGIN": "t"}).topic_for("VOUCHER_USED")


def test_settings_read_topic_routes_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAKE_EVENTS_DATABASE_URL", "postgresql+psycopg://u:p@h/db")
    monkeypatch.setenv("CAKE_EVENTS_TOPIC_ROUTES", '{"USER_FIRST_LOGIN": "users"}')
    assert EventsSettings().topic_routes == {"USER_FIRST_LOGIN": "users"}
    monkeypatch.setenv("CAKE_EVENTS_TOPIC_ROUTES", '{"USER_LOGOUT": "users"}')
    with pytest.raises(ValueError, match="does not publish: USER_LOGOUT"):
        EventsSettings()
    # The audit log's events are kept by the relay, never routed to a topic.
    monkeypatch.setenv("CAKE_EVENTS_TOPIC_ROUTES", '{"SECURITY_AUDIT": "audit"}')
    with pytest.raises(ValueError, match="does not publish: SECURITY_AUDIT"):
        EventsSettings()


def test_default_routes_are_the_registrys_topics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAKE_EVENTS_DATABASE_URL", "postgresql+psycopg://u:p@h/db")
    monkeypatch.delenv("CAKE_EVENTS_TOPIC_ROUTES", raising=False)
    assert EventsSettings().topic_routes == {
        "USER_FIRST_LOGIN": "cake.auth.user.v1",
        "PROMOTION_ENROLLMENT": "cake.promotions.voucher.v1",
        "VOUCHER_ISSUED": "cake.promotions.voucher.v1",
        "VOUCHER_USED": "cake.promotions.voucher.v1",
        "PAYMENT_PROCESSED": "cake.promotions.payment.v1",
    }


def test_envelope_carries_the_row_and_the_contract_headers() -> None:
    event = outbox_event()
    message = EnvelopeBuilder().message_for(event, "cake.auth.user.v1")

    assert message.topic == "cake.auth.user.v1"
    assert message.key == b"7"
    envelope = envelope_pb2.EventEnvelope.FromString(message.value)
    assert envelope.event_id == str(event.event_id)
    assert envelope.type == "USER_FIRST_LOGIN"
    assert envelope.aggregate_type == "user"
    assert envelope.aggregate_id == "7"
    assert envelope.occurred_at.ToDatetime(tzinfo=UTC) == OCCURRED
    assert envelope.trace_parent == event.trace_parent
    unpacked = payloads_pb2.UserFirstLogin()
    assert envelope.payload.Unpack(unpacked)
    assert unpacked.user_id == 7
    assert dict(message.headers) == {
        "ce_id": str(event.event_id).encode(),
        "ce_type": b"USER_FIRST_LOGIN",
        "traceparent": event.trace_parent.encode(),  # type: ignore[union-attr]
    }


@given(
    st.datetimes(
        min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(UTC)
    )
)
def test_envelope_time_is_protobufs_own_conversion_to_the_microsecond(
    occurred_at: datetime,
) -> None:
    event = dataclasses.replace(outbox_event(), occurred_at=occurred_at)
    envelope = envelope_pb2.EventEnvelope.FromString(
        EnvelopeBuilder().message_for(event, "t").value
    )
    expected = Timestamp()
    expected.FromDatetime(occurred_at)
    assert envelope.occurred_at == expected
    assert 0 <= envelope.occurred_at.nanos < 1_000_000_000


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (outbox_event(event_type="USER_LOGOUT"), "unknown event type"),
        (
            outbox_event(event_type="SECURITY_AUDIT", payload_type="cake.events.v1.SecurityAudit"),
            "unknown event type",
        ),
        (outbox_event(payload_type="cake.events.v1.VoucherUsed"), "carries"),
        (outbox_event(payload=b"\x0a\xff"), "not a valid"),
    ],
)
def test_rows_breaking_the_event_contract_are_poison(event: OutboxEvent, reason: str) -> None:
    with pytest.raises(PoisonEvent, match=reason):
        EnvelopeBuilder().message_for(event, "topic")


def test_dead_letter_message_keeps_the_unreadable_payload_and_says_why_and_whence() -> None:
    event = outbox_event(row_id=41, payload=b"\x0a\xff")
    message = EnvelopeBuilder().dead_letter_message_for(
        event, "t.dlq", "payload is bad", source="auth"
    )
    envelope = envelope_pb2.EventEnvelope.FromString(message.value)
    assert envelope.payload.value == b"\x0a\xff"
    # The one dead-letter header set, the same the promotions consumer writes.
    headers = dict(message.headers)
    assert headers["cake_dead_letter_reason"] == b"payload is bad"
    assert headers["cake_dead_letter_origin"] == b"outbox/auth/41"
    assert headers["ce_type"] == b"USER_FIRST_LOGIN"


def _low(low: float, high: float) -> float:
    return low


def _high(low: float, high: float) -> float:
    return high


def test_backoff_is_the_shared_policy_doubling_with_jitter_and_capped() -> None:
    policy = FailurePolicy(max_attempts=10, backoff=RetryPolicy(base_seconds=1, max_seconds=5))
    low = [policy.after_failure(n, _low).retry_in_seconds for n in range(5)]
    high = [policy.after_failure(n, _high).retry_in_seconds for n in range(5)]
    assert low == [0.5, 1.0, 2.0, 2.5, 2.5]
    assert high == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert policy.after_failure(1, _low).attempts == 2
    # Exactly what the consumer and start-up wait after as many failures in a row.
    shared = RetryPolicy(base_seconds=1, max_seconds=5)
    for attempts_before in range(8):
        drawn: list[tuple[float, float]] = []

        def record(low: float, high: float, into: list[tuple[float, float]] = drawn) -> float:
            into.append((low, high))
            return low

        policy.after_failure(attempts_before, record)
        assert drawn == [
            (shared.ceiling(attempts_before + 1) / 2, shared.ceiling(attempts_before + 1))
        ]


def test_the_last_allowed_attempt_dead_letters() -> None:
    policy = FailurePolicy(max_attempts=3, backoff=RetryPolicy(base_seconds=1, max_seconds=5))
    assert not policy.after_failure(1, _low).dead_letter
    verdict = policy.after_failure(2, _low)
    assert verdict.dead_letter
    assert verdict.attempts == 3


def test_huge_attempt_counts_do_not_overflow() -> None:
    policy = FailurePolicy(max_attempts=10_000, backoff=RetryPolicy(base_seconds=1, max_seconds=60))
    assert policy.after_failure(5000, _low).retry_in_seconds == 30


def test_failure_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        FailurePolicy(max_attempts=0, backoff=RetryPolicy(base_seconds=1, max_seconds=2))
    with pytest.raises(ValueError):
        RetryPolicy(base_seconds=0, max_seconds=2)


def test_aggregates_failed_in_the_previous_batch_start_held_back() -> None:
    order = AggregateOrder(held_back={"a"})
    assert not order.may_publish(outbox_event(1, aggregate_id="a"))
    assert order.may_publish(outbox_event(2, aggregate_id="b"))


def test_a_failed_row_holds_back_the_rest_of_its_aggregate_only() -> None:
    order = AggregateOrder()
    first_a, second_a, first_b = (
        outbox_event(1, aggregate_id="a"),
        outbox_event(2, aggregate_id="a"),
        outbox_event(3, aggregate_id="b"),
    )
    assert order.may_publish(first_a)
    order.stop_after(first_a)
    assert not order.may_publish(second_a)
    assert order.may_publish(first_b)


def test_overtaken_aggregates_are_those_with_a_later_row_acknowledged() -> None:
    failed = [outbox_event(5, aggregate_id="a"), outbox_event(9, aggregate_id="b")]
    acknowledged = [
        outbox_event(6, aggregate_id="a"),  # later than the failed row 5: overtook it
        outbox_event(8, aggregate_id="b"),  # earlier than the failed row 9: fine
        outbox_event(7, aggregate_id="c"),
    ]
    assert overtaken_aggregates(failed, acknowledged) == {"a"}


def test_error_text_is_one_bounded_line() -> None:
    text = error_text(ValueError("line one\nline two" + "x" * 5000))
    assert text.startswith("ValueError: line one line two")
    assert len(text) == 2000


def test_page_token_round_trips_and_rejects_garbage() -> None:
    cursor = DeadLetterCursor(OCCURRED, uuid.uuid4())
    assert DeadLetterCursor.from_token(cursor.token()) == cursor
    for garbage in ("", "not-base64!", "W10", "eyJmIjogMX0", cursor.token()[:-3]):
        with pytest.raises(InvalidPageTokenError):
            DeadLetterCursor.from_token(garbage)
