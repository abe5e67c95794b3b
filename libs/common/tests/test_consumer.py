"""The generic Kafka consumer's decisions, with fakes: which records go to which handler,
which are skipped, which are dead-lettered and with what headers; what is retried and how
long it waits; what is committed. The loop on real Kafka + PostgreSQL is in
``test_consumer_integration.py``."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy.exc
from aiokafka.structs import ConsumerRecord, TopicPartition
from cake.events.v1 import envelope_pb2, payloads_pb2, registry
from cake_common.consumer import (
    ConsumedEvent,
    ConsumerMetrics,
    EventConsumer,
    FatalConsumerError,
    PoisonEvent,
    Routes,
    commit_offsets,
    dead_letter_headers,
)
from cake_common.retry import RetryPolicy
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

USERS = registry.USER_FIRST_LOGIN.topic
VOUCHERS = registry.VOUCHER_ISSUED.topic
STAMP = Timestamp()
STAMP.FromDatetime(datetime(2026, 1, 1, tzinfo=UTC))


def value(spec: registry.EventSpec[Any], payload: Message) -> bytes:
    packed = AnyMessage()
    packed.Pack(payload)
    return envelope_pb2.EventEnvelope(
        event_id=str(uuid.uuid4()),
        type=spec.name,
        occurred_at=STAMP,
        aggregate_type=spec.aggregate_type,
        aggregate_id="5",
        payload=packed,
    ).SerializeToString()


def login(user_id: int = 5) -> bytes:
    return value(
        registry.USER_FIRST_LOGIN, payloads_pb2.UserFirstLogin(user_id=user_id, login_at=STAMP)
    )


def issued() -> bytes:
    return value(
        registry.VOUCHER_ISSUED,
        payloads_pb2.VoucherIssued(
            voucher_id=1,
            code="CAKE-ABCD1234",
            user_id=5,
            campaign_id=1,
            discount_percentage="30.00",
            expires_at=STAMP,
            issued_at=STAMP,
        ),
    )


def used() -> bytes:
    return value(registry.VOUCHER_USED, payloads_pb2.VoucherUsed(voucher_id=1, user_id=5))


def record(
    topic: str, raw: bytes | None, offset: int = 0, partition: int = 0
) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord(
        topic, partition, offset, 0, 0, b"5", raw, None, 1, len(raw or b""), [("h", b"v")]
    )


class Recorder:
    """A handler that records what it was given and fails as told."""

    def __init__(self, failures: Sequence[BaseException | None] = ()) -> None:
        self.calls: list[list[ConsumedEvent[Any]]] = []
        self._failures = list(failures)

    async def __call__(self, events: Sequence[ConsumedEvent[Any]]) -> list[str]:
        self.calls.append(list(events))
        if self._failures and (failure := self._failures.pop(0)) is not None:
            raise failure
        return ["applied"] * len(events)


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, list[tuple[str, bytes]]]] = []

    async def send_and_wait(
        self, topic: str, *, value: bytes | None, key: bytes | None, headers: Any
    ) -> None:
        self.sent.append((topic, value, headers))


def new_consumer(
    metrics_registry: CollectorRegistry, kind: type[EventConsumer] = EventConsumer
) -> EventConsumer:
    return kind(
        name="test",
        metrics=ConsumerMetrics("test", metrics_registry),
        bootstrap_servers="unused:9092",
        group_id="unused",
        client_id="unused",
        retry=RetryPolicy(base_seconds=0.001, max_seconds=0.001),
    )


def consumer_with(
    **handlers: tuple[registry.PublishedEvent[Any], Recorder],
) -> tuple[EventConsumer, CollectorRegistry, FakeProducer]:
    metrics_registry = CollectorRegistry()
    consumer = new_consumer(metrics_registry)
    for spec, handler in handlers.values():
        consumer.register(spec, handler)
    producer = FakeProducer()
    consumer._producer = producer  # the one seam of the loop: its dead-letter producer
    return consumer, metrics_registry, producer


def sample(metrics: CollectorRegistry, name: str, **labels: str) -> float:
    return metrics.get_sample_value(f"cake_test_{name}_total", labels) or 0.0


# -- the retry policy --------------------------------------------------------------------


def test_the_retry_ceiling_doubles_from_the_base_and_is_capped() -> None:
    policy = RetryPolicy(base_seconds=0.2, max_seconds=1.0)
    assert [policy.ceiling(n) for n in range(1, 6)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    assert policy.ceiling(10_000) == 1.0  # no overflow however long the outage


def test_the_retry_delay_is_jittered_between_half_the_ceiling_and_the_ceiling() -> None:
    policy = RetryPolicy(base_seconds=0.2, max_seconds=10.0)
    bounds: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        bounds.append((low, high))
        return low

    assert policy.delay(3, uniform) == 0.4
    assert bounds == [(0.4, 0.8)]
    for _ in range(50):
        assert 0.4 <= policy.delay(3) <= 0.8


def test_a_retry_policy_needs_positive_durations() -> None:
    with pytest.raises(ValueError, match="positive"):
        RetryPolicy(base_seconds=0)


# -- decoding and dispatch ---------------------------------------------------------------


def test_a_batch_is_split_by_event_type_in_order() -> None:
    logins, vouchers = Recorder(), Recorder()
    consumer, _, _ = consumer_with(
        a=(registry.USER_FIRST_LOGIN, logins), b=(registry.VOUCHER_ISSUED, vouchers)
    )
    records = [
        record(VOUCHERS, issued(), 0),
        record(USERS, login(1), 0),
        record(USERS, login(2), 1),
    ]
    batch = Routes(consumer._routes, consumer._carried).sort(records)
    assert [route.spec.name for route, _ in batch.groups] == ["VOUCHER_ISSUED", "USER_FIRST_LOGIN"]
    first_logins = batch.groups[1][1]
    assert [d.event.payload.user_id for d in first_logins] == [1, 2]
    assert isinstance(first_logins[0].event.payload, payloads_pb2.UserFirstLogin)
    assert (batch.poison, batch.skipped) == ([], 0)


def test_a_type_the_topic_carries_but_nobody_here_handles_is_skipped() -> None:
    consumer, _, _ = consumer_with(a=(registry.VOUCHER_ISSUED, Recorder()))
    batch = Routes(consumer._routes, consumer._carried).sort([record(VOUCHERS, used())])
    assert (batch.groups, batch.poison, batch.skipped) == ([], [], 1)


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (None, "empty"),
        (b"\xff\xff\xff", "undecodable"),
        (used(), "unexpected_type"),  # not a type of the user topic
        (
            value(registry.USER_FIRST_LOGIN, payloads_pb2.UserFirstLogin(user_id=5)),
            "invalid_payload",
        ),
        (value(registry.USER_FIRST_LOGIN, payloads_pb2.VoucherUsed(voucher_id=1)), "wrong_payload"),
    ],
)
def test_a_record_that_breaks_its_contract_is_poison(raw: bytes | None, kind: str) -> None:
    consumer, _, _ = consumer_with(a=(registry.USER_FIRST_LOGIN, Recorder()))
    batch = Routes(consumer._routes, consumer._carried).sort([record(USERS, raw)])
    assert batch.groups == []
    [(_, poison)] = batch.poison
    assert poison.kind == kind


def test_a_dead_letter_keeps_the_headers_and_adds_the_registry_reason_and_origin() -> None:
    headers = dead_letter_headers(record(USERS, b"x", 41, 2), PoisonEvent("undecodable", "why"))
    assert headers == [
        ("h", b"v"),
        (registry.DEAD_LETTER_REASON_HEADER, b"undecodable: why"),
        (registry.DEAD_LETTER_ORIGIN_HEADER, f"{USERS}/2/41".encode()),
    ]


def test_each_partition_is_committed_past_its_last_record() -> None:
    first, second = TopicPartition(USERS, 0), TopicPartition(USERS, 1)
    offsets = commit_offsets(
        {
            first: [record(USERS, b"", 3), record(USERS, b"", 4)],
            second: [],
            TopicPartition(USERS, 2): [record(USERS, b"", 9, 2)],
        }
    )
    assert offsets == {first: 5, TopicPartition(USERS, 2): 10}


def test_a_second_handler_for_one_type_and_topic_is_refused() -> None:
    consumer, _, _ = consumer_with(a=(registry.USER_FIRST_LOGIN, Recorder()))
    with pytest.raises(ValueError, match="already has a handler"):
        consumer.register(registry.USER_FIRST_LOGIN, Recorder())
    consumer.register(registry.USER_FIRST_LOGIN, Recorder(), topic="test.users")
    assert consumer.topics == sorted([USERS, "test.users"])


# -- what the loop does with a batch -----------------------------------------------------


async def test_poison_is_dead_lettered_to_the_registry_topic_and_the_rest_applied() -> None:
    handler = Recorder()
    consumer, metrics, producer = consumer_with(a=(registry.USER_FIRST_LOGIN, handler))
    assert await consumer._handle([record(USERS, b"\xff"), record(USERS, login(), 1)])
    assert [len(call) for call in handler.calls] == [1]
    [(topic, raw, headers)] = producer.sent
    assert (topic, raw) == (registry.USER_FIRST_LOGIN.dead_letter_topic, b"\xff")
    assert (registry.DEAD_LETTER_REASON_HEADER, b"undecodable: not an EventEnvelope") in headers
    assert sample(metrics, "dead_letters", reason="undecodable") == 1
    assert sample(metrics, "consumed_events", result="applied") == 1
    assert sample(metrics, "consumed_events", result="dead_lettered") == 1


async def test_a_transient_failure_retries_the_whole_batch() -> None:
    outage = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("down"))
    handler = Recorder([outage, outage, None])
    consumer, metrics, producer = consumer_with(a=(registry.USER_FIRST_LOGIN, handler))
    assert await consumer._handle([record(USERS, login(1)), record(USERS, login(2), 1)])
    assert [len(call) for call in handler.calls] == [2, 2, 2]
    assert sample(metrics, "consumer_retries", kind="transient") == 2
    assert sample(metrics, "consumed_events", result="applied") == 2
    assert producer.sent == []


async def test_an_unexpected_failure_parks_only_the_bad_event() -> None:
    bug = RuntimeError("bug")

    class FailsOnUser2(Recorder):
        async def __call__(self, events: Sequence[ConsumedEvent[Any]]) -> list[str]:
            self.calls.append(list(events))
            if any(event.payload.user_id == 2 for event in events):
                raise bug
            return ["applied"] * len(events)

    handler = FailsOnUser2()
    consumer, metrics, producer = consumer_with(a=(registry.USER_FIRST_LOGIN, handler))
    records = [record(USERS, login(user), offset) for offset, user in enumerate((1, 2, 3))]
    assert await consumer._handle(records)
    # The batch, then one at a time: 1 once, 2 three times (then parked), 3 once.
    assert [[e.payload.user_id for e in call] for call in handler.calls] == [
        [1, 2, 3],
        [1],
        [2],
        [2],
        [2],
        [3],
    ]
    [(topic, raw, headers)] = producer.sent
    assert (topic, raw) == (registry.USER_FIRST_LOGIN.dead_letter_topic, records[1].value)
    assert (
        registry.DEAD_LETTER_REASON_HEADER,
        b"processing_failed: RuntimeError('bug')",
    ) in headers
    assert sample(metrics, "dead_letters", reason="processing_failed") == 1
    assert sample(metrics, "consumed_events", result="applied") == 2


async def test_a_fatal_error_is_not_retried() -> None:
    handler = Recorder([FatalConsumerError("unknown schema")])
    consumer, metrics, producer = consumer_with(a=(registry.USER_FIRST_LOGIN, handler))
    with pytest.raises(FatalConsumerError):
        await consumer._handle([record(USERS, login())])
    assert len(handler.calls) == 1
    assert producer.sent == []
    assert sample(metrics, "consumer_retries", kind="unexpected") == 0


async def test_a_crashed_loop_is_restarted_and_a_fatal_error_stops_it_for_good() -> None:
    class Crashing(EventConsumer):
        runs = 0

        async def _run(self) -> None:  # the poll loop, failing as a bug then a misconfiguration
            self.runs += 1
            if self.runs < 3:
                raise RuntimeError("bug")
            raise FatalConsumerError("the group is not authorised")

    metrics = CollectorRegistry()
    consumer = new_consumer(metrics, Crashing)
    consumer.register(registry.USER_FIRST_LOGIN, Recorder())
    failures: list[BaseException] = []
    with capture_logs() as logs:
        consumer.start(on_failure=failures.append)
        with pytest.raises(FatalConsumerError):
            await asyncio.wait_for(consumer.wait(), timeout=10)
    assert isinstance(consumer, Crashing)
    assert consumer.runs == 3
    assert metrics.get_sample_value("cake_test_consumer_restarts_total") == 2
    assert [type(error) for error in failures] == [FatalConsumerError]
    critical = [entry for entry in logs if entry["log_level"] == "critical"]
    assert [entry["event"] for entry in critical] == [
        "kafka consumer stopped by a fatal error; the process must stop"
    ]
    assert not await consumer.is_consuming()
