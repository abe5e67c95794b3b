"""Which Kafka messages the first-login consumer applies and which it dead-letters: the
generic consumer's decoding with the first-login handler's route, then the handler's mapping."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord
from cake.events.v1 import envelope_pb2, payloads_pb2, registry
from cake_common.consumer import PoisonEvent, Route, Routes
from cake_promotions.entrypoints.kafka import first_login
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.timestamp_pb2 import Timestamp

LOGIN_AT = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
TOPIC = registry.USER_FIRST_LOGIN.topic


async def unused_handler(events: Any) -> list[str]:
    raise AssertionError("decoding never calls the handler")


ROUTES = Routes(
    by_topic={TOPIC: {"USER_FIRST_LOGIN": Route(registry.USER_FIRST_LOGIN, unused_handler, "")}},
    carried={TOPIC: frozenset({"USER_FIRST_LOGIN"})},
)


def record(value: bytes | None) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord(
        TOPIC, 0, 7, 0, 0, b"5", value, None, 1, 0 if value is None else len(value), []
    )


def decode_first_login(value: bytes | None) -> Any:
    batch = ROUTES.sort([record(value)])
    if batch.poison:
        raise batch.poison[0][1]
    assert batch.skipped == 0
    [(_, [delivery])] = batch.groups
    return first_login(delivery.event)


def envelope(
    *, event_type: str = "USER_FIRST_LOGIN", user_id: int = 5, payload: object = None
) -> envelope_pb2.EventEnvelope:
    stamp = Timestamp()
    stamp.FromDatetime(LOGIN_AT)
    packed = AnyMessage()
    packed.Pack(payload or payloads_pb2.UserFirstLogin(user_id=user_id, login_at=stamp))  # type: ignore[arg-type]
    return envelope_pb2.EventEnvelope(
        event_id=str(uuid.uuid4()),
        type=event_type,
        occurred_at=stamp,
        aggregate_type="user",
        aggregate_id=str(user_id),
        payload=packed,
    )


def test_a_first_login_is_decoded() -> None:
    message = envelope()
    event = decode_first_login(message.SerializeToString())
    assert event.event_id == uuid.UUID(message.event_id)
    assert (event.user_id, event.login_at) == (5, LOGIN_AT)


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (None, "empty"),
        (b"\xff\xff\xff", "undecodable"),
        (envelope(event_type="VOUCHER_USED").SerializeToString(), "unexpected_type"),
        (envelope(user_id=0).SerializeToString(), "invalid_payload"),
        (
            envelope(payload=payloads_pb2.UserFirstLogin(user_id=5)).SerializeToString(),
            "invalid_payload",
        ),
        (
            envelope(payload=payloads_pb2.VoucherUsed(voucher_id=1)).SerializeToString(),
            "wrong_payload",
        ),
    ],
)
def test_events_that_can_never_be_applied_are_poison(value: bytes | None, kind: str) -> None:
    with pytest.raises(PoisonEvent) as caught:
        decode_first_login(value)
    assert caught.value.kind == kind


def test_envelope_without_event_id_is_poison() -> None:
    message = envelope()
    message.event_id = "not-a-uuid"
    with pytest.raises(PoisonEvent) as caught:
        decode_first_login(message.SerializeToString())
    assert caught.value.kind == "invalid_envelope"


def test_the_whole_envelope_contract_is_checked() -> None:
    message = envelope()
    message.aggregate_id = ""
    message.ClearField("occurred_at")
    with pytest.raises(PoisonEvent) as caught:
        decode_first_login(message.SerializeToString())
    assert caught.value.kind == "invalid_envelope"
    assert "occurred_at: value is required" in caught.value.detail
    assert "aggregate_id: must be at least 1 characters" in caught.value.detail
