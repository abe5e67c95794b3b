"""The relay's decisions, run end to end against in-memory fakes of its ports
(:mod:`cake_events.service.ports`): which topic each row goes to, what is marked published,
what is retried and with which delay, what becomes a dead letter (and its copy on the
dead-letter topic), and what happens while Kafka is away.

The fake outbox keeps the contract of the real one (claims in id order, outcomes recorded
only when the claim transaction commits); the SQL itself has integration tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, Self

from aiokafka.errors import (
    CorruptRecordException,
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
)
from cake.events.v1 import envelope_pb2, payloads_pb2, registry
from cake_common.retry import RetryPolicy
from cake_events.adapters.kafka_publisher import broker_unavailable
from cake_events.domain.delivery import DeadLetter, PublishedBatch
from cake_events.domain.envelope import KafkaMessage
from cake_events.domain.relay import (
    DEFAULT_TOPIC_ROUTES,
    Backlog,
    FailurePolicy,
    OutboxEvent,
    ParkedRow,
    ScheduledRetry,
    TopicRoutes,
)
from cake_events.metrics import RelayMetrics
from cake_events.service.relay import OutboxRelay, RelayTiming
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry

OCCURRED = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
SOURCE = "auth"
USER_TOPIC = registry.USER_FIRST_LOGIN.topic
PAYMENT_TOPIC = registry.PAYMENT_PROCESSED.topic
MAX_ATTEMPTS = 3
# The jitter is pinned to the middle: the n-th retry waits base * 2**(n-1) * 0.75 seconds.
POLICY = FailurePolicy(
    max_attempts=MAX_ATTEMPTS, backoff=RetryPolicy(base_seconds=1, max_seconds=5)
)


def user_login(row_id: int, user_id: int = 7) -> OutboxEvent:
    login_at = Timestamp()
    login_at.FromDatetime(OCCURRED)
    spec = registry.USER_FIRST_LOGIN
    return OutboxEvent(
        id=row_id,
        event_id=str(uuid.uuid4()),
        event_type=spec.name,
        aggregate_type=spec.aggregate_type,
        aggregate_id=str(user_id),
        payload=payloads_pb2.UserFirstLogin(user_id=user_id, login_at=login_at).SerializeToString(),
        payload_type=spec.payload_type,
        occurred_at=OCCURRED,
        trace_parent=None,
        attempts=0,
    )


def payment(row_id: int, aggregate_id: str = "TXN-1") -> OutboxEvent:
    spec = registry.PAYMENT_PROCESSED
    return OutboxEvent(
        id=row_id,
        event_id=str(uuid.uuid4()),
        event_type=spec.name,
        aggregate_type=spec.aggregate_type,
        aggregate_id=aggregate_id,
        payload=payloads_pb2.PaymentProcessed(transaction_id=aggregate_id).SerializeToString(),
        payload_type=spec.payload_type,
        occurred_at=OCCURRED,
        trace_parent=None,
        attempts=0,
    )


# -- fakes of the ports --------------------------------------------------------------------


class FakeOutbox:
    """The source's outbox table and the leader session on it."""

    def __init__(self, rows: Sequence[OutboxEvent]) -> None:
        self.rows = {row.id: row for row in rows}
        self.published: list[int] = []
        self.retries: list[ScheduledRetry] = []
        self.parked: dict[int, ParkedRow] = {}
        self.claims: list[list[int]] = []
        self.closed = 0
        self.idle = asyncio.Event()
        self._staged: list[tuple[list[int], list[ScheduledRetry], list[ParkedRow]]] = []

    def _claimable(self, exclude_ids: Sequence[int]) -> list[OutboxEvent]:
        done = set(self.published) | set(self.parked) | set(exclude_ids)
        return [row for row_id, row in sorted(self.rows.items()) if row_id not in done]

    # RelayLeader
    async def listen(self) -> None:
        pass

    async def wait_for_notification(self, timeout_seconds: float) -> bool:
        if self._claimable(()):
            return True  # retries are due at once in this fake
        self.idle.set()
        await asyncio.sleep(0.001)
        return False

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        self._staged = []
        yield  # raising drops what was staged, like a rollback
        for published, retries, parked in self._staged:
            self.published += published
            self.retries += retries
            for row in parked:
                self.parked[row.row_id] = row
            for retry in retries:
                self.rows[retry.row_id] = replace(self.rows[retry.row_id], attempts=retry.attempts)

    async def claim(
        self, batch_size: int, *, exclude_ids: Sequence[int], guard_retries: bool
    ) -> list[OutboxEvent]:
        claimed = self._claimable(exclude_ids)[:batch_size]
        self.claims.append([row.id for row in claimed])
        return claimed

    async def record_outcome(
        self,
        *,
        published_ids: Sequence[int],
        retries: Sequence[ScheduledRetry],
        parked: Sequence[ParkedRow],
    ) -> None:
        self._staged.append((list(published_ids), list(retries), list(parked)))

    async def backlog(self) -> Backlog:
        waiting = len(self._claimable(()))
        return Backlog(waiting=waiting, oldest_age_seconds=0.0, in_retry=0)

    async def delete_published_older_than(self, retention_seconds: float) -> int:
        return 0

    async def close(self) -> None:
        self.closed += 1


class FakeBatch:
    """Messages of one topic partition, answered together."""

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self.messages: list[KafkaMessage] = []
        self.answer: asyncio.Future[Any] | None = None
        self.error: BaseException | None = None

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        if self.answer is None:
            raise asyncio.InvalidStateError()
        return self.answer.result()


class FakeBatches:
    """One claim's per-partition batches, as the real adapter shapes them: a message's
    partition follows its key, a batch holds ``kafka.batch_capacity`` messages, a full one
    is handed to the fake Kafka at once, and a message too large is refused on its own."""

    def __init__(self, kafka: FakeKafka) -> None:
        self._kafka = kafka
        self._known_topics: set[str] = set()
        self._open: dict[tuple[str, int], FakeBatch] = {}
        self._full: FakeBatch | None = None
        self._broken: BaseException | None = None

    def add(self, message: KafkaMessage) -> tuple[FakeBatch, int] | None:
        if message.topic not in self._known_topics:
            return None  # the real one first asks the producer for the topic's partitions
        if self._kafka.refuses(message):
            raise MessageSizeTooLargeError()
        partition = sum(message.key) % self._kafka.partitions
        batch = self._open.setdefault(
            (message.topic, partition), FakeBatch(message.topic, partition)
        )
        if len(batch.messages) >= self._kafka.batch_capacity:
            self._full = batch
            return None
        batch.messages.append(message)
        return batch, len(batch.messages) - 1

    async def add_waiting(self, message: KafkaMessage) -> tuple[FakeBatch, int]:
        if self._broken is not None:
            raise self._broken
        self._known_topics.add(message.topic)
        placed = self.add(message)
        if placed is None:
            full, self._full = self._full, None
            assert full is not None
            await self._send(full)
            placed = self.add(message)
        assert placed is not None
        return placed

    async def send_all(self) -> None:
        for batch in list(self._open.values()):
            if self._broken is not None:
                batch.error = self._broken
                del self._open[batch.topic, batch.partition]
                continue
            with contextlib.suppress(KafkaError):
                await self._send(batch)

    async def _send(self, batch: FakeBatch) -> None:
        del self._open[batch.topic, batch.partition]
        if self._kafka.lost_on_hand_over:
            self._kafka.lost_on_hand_over -= 1
            batch.error = self._broken = KafkaConnectionError("broker gone")
            raise batch.error
        self._kafka.handed_over.append(batch)
        batch.answer = self._kafka.answer(batch.topic, batch.partition, batch.messages)


class FakeKafka:
    """A producer whose answers the test decides, per event type or per row. It takes a
    claim's messages as per-partition batches (:class:`FakeBatches`) and answers each batch
    as a whole; dead-letter copies go one by one (``send``). It sorts Kafka's errors as the
    real publisher does (``broker_unavailable``)."""

    send_errors = (KafkaError, OSError)
    unavailable = staticmethod(broker_unavailable)

    def __init__(self) -> None:
        self.up = True
        self.starts = 0
        self.refused_thrice = asyncio.Event()
        self.resets = 0
        self.closed = 0
        self.acknowledged: list[KafkaMessage] = []
        self.logs: dict[tuple[str, int], list[KafkaMessage]] = {}
        """Each topic partition's messages: a message's offset is its index."""
        self.handed_over: list[FakeBatch] = []
        """The batches handed over, in order."""
        self.partitions = 1
        self.batch_capacity = 100
        self.rejected_types: set[str] = set()
        """Event types Kafka refuses for themselves (too large): retried, then dead letters."""
        self.connection_lost_once: set[str] = set()
        """Event ids whose first batch finds the broker gone (the whole batch fails)."""
        self.failed_once: set[str] = set()
        """Event ids whose first batch Kafka fails for itself (the whole batch fails)."""
        self.lost_on_hand_over = 0
        """Batches whose hand-over finds the producer failed (Kafka away)."""

    async def start(self) -> bool:
        self.starts += 1
        if not self.up and self.starts >= 3:
            self.refused_thrice.set()
        return self.up

    def batches(self) -> FakeBatches:
        return FakeBatches(self)

    def refuses(self, message: KafkaMessage) -> bool:
        event_type = dict(message.headers)[registry.EVENT_TYPE_HEADER].decode()
        return event_type in self.rejected_types and not message.topic.endswith(
            registry.DEAD_LETTER_TOPIC_SUFFIX
        )

    def answer(
        self, topic: str, partition: int, messages: Sequence[KafkaMessage]
    ) -> asyncio.Future[Any]:
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        ids = {dict(m.headers)[registry.EVENT_ID_HEADER].decode() for m in messages}
        if ids & self.connection_lost_once:
            self.connection_lost_once -= ids
            answer.set_exception(KafkaConnectionError("broker gone"))
        elif ids & self.failed_once:
            self.failed_once -= ids
            answer.set_exception(CorruptRecordException("batch refused"))
        else:
            log = self.logs.setdefault((topic, partition), [])
            answer.set_result(SimpleNamespace(partition=partition, offset=len(log)))
            log.extend(messages)
            self.acknowledged.extend(messages)
        return answer

    async def send(self, message: KafkaMessage) -> asyncio.Future[Any]:
        if self.refuses(message):
            raise MessageSizeTooLargeError()
        return self.answer(message.topic, 0, [message])

    async def flush(self) -> bool:
        return True

    async def reset(self) -> None:
        self.resets += 1

    async def close(self) -> None:
        self.closed += 1

    def topics(self) -> list[str]:
        return [message.topic for message in self.acknowledged]

    def event_ids(self, topic: str) -> list[str]:
        return [
            dict(m.headers)[registry.EVENT_ID_HEADER].decode()
            for m in self.acknowledged
            if m.topic == topic
        ]


@dataclass
class EventsDatabase:
    batches: list[PublishedBatch] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    commits: int = 0


class FakeEventsUnitOfWork:
    def __init__(self, database: EventsDatabase) -> None:
        self._database = database
        self._batches: list[PublishedBatch] = []
        self._letters: list[DeadLetter] = []
        self.published = self
        self.dead_letters = self
        self.audit = self

    async def record(self, batch: PublishedBatch) -> None:
        self._batches.append(batch)

    async def park(self, letters: Sequence[DeadLetter]) -> None:
        self._letters += letters

    async def append(self, entries: Sequence[Any], recorded_at: datetime) -> None:
        raise AssertionError("no security audit rows in these tests")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        pass

    async def commit(self) -> None:
        self._database.batches += self._batches
        self._database.dead_letters += self._letters
        self._database.commits += 1


@dataclass
class Relay:
    relay: OutboxRelay
    outbox: FakeOutbox
    kafka: FakeKafka
    database: EventsDatabase
    metrics: RelayMetrics
    registry: CollectorRegistry
    leaderships: list[float]

    async def run_until_idle(self) -> None:
        """Relay until nothing is left to claim or record, then stop gracefully."""
        stop = asyncio.Event()
        running = asyncio.create_task(self.relay.run(stop))
        await asyncio.wait_for(self.outbox.idle.wait(), 5)
        stop.set()
        await asyncio.wait_for(running, 5)

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, {"source": SOURCE, **labels})
        return value or 0.0


def make_relay(*rows: OutboxEvent, batch_size: int = 10, **timing: float) -> Relay:
    outbox = FakeOutbox(rows)
    kafka = FakeKafka()
    database = EventsDatabase()
    metrics_registry = CollectorRegistry()
    metrics = RelayMetrics(metrics_registry)
    leaderships: list[float] = []

    async def leadership(*, retry_seconds: float, stop: asyncio.Event) -> FakeOutbox | None:
        leaderships.append(retry_seconds)
        return None if stop.is_set() else outbox

    relay = OutboxRelay(
        SOURCE,
        leadership=leadership,
        publisher=kafka,
        events_uow=lambda: FakeEventsUnitOfWork(database),  # type: ignore[arg-type, return-value]
        routes=TopicRoutes(DEFAULT_TOPIC_ROUTES),
        failure_policy=POLICY,
        timing=replace(
            RelayTiming(
                batch_size=batch_size,
                poll_interval_seconds=0.01,
                leader_retry_seconds=0.5,
                metrics_refresh_seconds=60,
                retention_seconds=3600,
                retention_sweep_seconds=60,
            ),
            **timing,
        ),
        metrics=metrics,
        uniform=lambda low, high: (low + high) / 2,
    )
    return Relay(relay, outbox, kafka, database, metrics, metrics_registry, leaderships)


# -- routing ----------------------------------------------------------------------------------


async def test_each_row_goes_to_its_registry_topic_keyed_by_aggregate_and_is_marked() -> None:
    rows = [user_login(1, user_id=7), payment(2, "TXN-9"), user_login(3, user_id=8)]
    relay = make_relay(*rows)

    await relay.run_until_idle()

    # One batch per topic partition: the order holds within each topic.
    assert relay.kafka.event_ids(USER_TOPIC) == [rows[0].event_id, rows[2].event_id]
    assert relay.kafka.event_ids(PAYMENT_TOPIC) == [rows[1].event_id]
    assert [m.key for m in relay.kafka.logs[USER_TOPIC, 0]] == [b"7", b"8"]
    assert [m.key for m in relay.kafka.logs[PAYMENT_TOPIC, 0]] == [b"TXN-9"]
    first = envelope_pb2.EventEnvelope.FromString(relay.kafka.logs[USER_TOPIC, 0][0].value)
    assert (first.event_id, first.type) == (rows[0].event_id, rows[0].event_type)
    assert sorted(relay.outbox.published) == [1, 2, 3]
    assert relay.outbox.retries == [] and relay.outbox.parked == {}
    # The events database keeps where each event went.
    [batch] = relay.database.batches
    assert batch.source == SOURCE
    assert batch.event_ids == [row.event_id for row in rows]
    assert batch.topics == [USER_TOPIC, PAYMENT_TOPIC, USER_TOPIC]
    # Offsets are per topic partition (one partition each here).
    assert batch.offsets == [0, 0, 1]
    assert relay.sample("cake_events_relay_published_total", topic=USER_TOPIC) == 2
    assert relay.sample("cake_events_relay_published_total", topic=PAYMENT_TOPIC) == 1
    # Stopping gives the session and the producer back.
    assert (relay.outbox.closed, relay.kafka.closed) == (1, 1)
    assert relay.relay.in_flight == 0 and not relay.relay.is_active


async def test_batches_are_claimed_in_order_without_claiming_a_batch_twice() -> None:
    relay = make_relay(*(user_login(i, user_id=i) for i in range(1, 6)), batch_size=2)

    await relay.run_until_idle()

    assert [c for c in relay.outbox.claims if c] == [[1, 2], [3, 4], [5]]
    assert relay.outbox.published == [1, 2, 3, 4, 5]
    assert [b.event_ids for b in relay.database.batches] == [
        [relay.outbox.rows[i].event_id for i in ids] for ids in ([1, 2], [3, 4], [5])
    ]


# -- the idle fallback poll ------------------------------------------------------------------


def recorded_waits(relay: Relay, *, notify_at: int | None = None, calls: int = 9) -> list[float]:
    """Make the outbox record each fallback wait the relay asks for (and answer the
    ``notify_at``-th with a notification) until ``calls`` waits were asked."""
    waits: list[float] = []

    async def wait_for_notification(timeout_seconds: float) -> bool:
        waits.append(timeout_seconds)
        if len(waits) >= calls:
            relay.outbox.idle.set()
        await asyncio.sleep(0.001)
        return len(waits) == notify_at

    relay.outbox.wait_for_notification = wait_for_notification  # type: ignore[method-assign]
    return waits


async def test_an_idle_relay_polls_less_and_less_and_a_notification_resets_the_wait() -> None:
    relay = make_relay(idle_poll_max_seconds=0.08)
    waits = recorded_waits(relay, notify_at=6)
    await relay.run_until_idle()
    assert waits[:9] == [0.01, 0.02, 0.04, 0.08, 0.08, 0.08, 0.01, 0.02, 0.04]


async def test_rows_in_retry_keep_the_relay_polling_at_the_base_interval() -> None:
    relay = make_relay(idle_poll_max_seconds=0.08)

    async def backlog() -> Backlog:
        return Backlog(waiting=0, oldest_age_seconds=0.0, in_retry=1)

    relay.outbox.backlog = backlog  # type: ignore[method-assign]
    waits = recorded_waits(relay)
    await relay.run_until_idle()
    assert waits[:9] == [0.01] * 9


async def test_without_a_maximum_the_fallback_poll_keeps_its_interval() -> None:
    relay = make_relay()  # idle_poll_max_seconds 0: no back-off
    waits = recorded_waits(relay)
    await relay.run_until_idle()
    assert waits[:9] == [0.01] * 9


async def test_a_long_idle_wait_does_not_hold_up_a_stop() -> None:
    relay = make_relay(poll_interval_seconds=30, idle_poll_max_seconds=60)

    async def wait_for_notification(timeout_seconds: float) -> bool:
        relay.outbox.idle.set()
        await asyncio.sleep(timeout_seconds)  # as the real session: no notification comes
        return False

    relay.outbox.wait_for_notification = wait_for_notification  # type: ignore[method-assign]
    started = time.monotonic()
    await relay.run_until_idle()
    assert time.monotonic() - started < 2
    assert (relay.outbox.closed, relay.kafka.closed) == (1, 1)


# -- retries and dead letters -------------------------------------------------------------------


async def test_an_event_type_without_route_is_retried_then_dead_lettered_in_the_database() -> None:
    poison = replace(user_login(1), event_type="NOT_A_REGISTERED_TYPE")
    relay = make_relay(poison, payment(2))

    await relay.run_until_idle()

    # Two retries with the jittered, doubling delay, then parked at the last attempt.
    assert [(r.row_id, r.attempts, r.delay_seconds) for r in relay.outbox.retries] == [
        (1, 1, 0.75),
        (1, 2, 1.5),
    ]
    assert relay.outbox.retries[0].error == "no topic route for event type 'NOT_A_REGISTERED_TYPE'"
    assert relay.outbox.parked == {1: ParkedRow(1, MAX_ATTEMPTS, relay.outbox.retries[0].error)}
    [letter] = relay.database.dead_letters
    assert (letter.event_id, letter.topic, letter.attempts) == (
        uuid.UUID(poison.event_id),
        None,
        MAX_ATTEMPTS,
    )
    assert letter.payload == poison.payload
    # Without a topic there is no dead-letter topic to copy it to: counted, not lost.
    assert relay.kafka.topics() == [PAYMENT_TOPIC]
    assert relay.sample("cake_events_relay_dead_letter_publish_failures_total") == 1
    assert relay.sample("cake_events_relay_failed_attempts_total", topic="") == MAX_ATTEMPTS
    assert relay.sample("cake_events_relay_dead_lettered_total", topic="") == 1
    assert relay.outbox.published == [2]


async def test_a_message_kafka_refuses_is_copied_to_the_dead_letter_topic_with_its_reason() -> None:
    relay = make_relay(payment(1, "TXN-1"), user_login(2))
    relay.kafka.rejected_types.add(registry.PAYMENT_PROCESSED.name)

    await relay.run_until_idle()

    [copy] = [m for m in relay.kafka.acknowledged if m.topic != USER_TOPIC]
    assert copy.topic == registry.PAYMENT_PROCESSED.dead_letter_topic
    headers = dict(copy.headers)
    [letter] = relay.database.dead_letters
    assert headers[registry.DEAD_LETTER_REASON_HEADER].decode() == letter.last_error
    assert "MessageSizeTooLarge" in letter.last_error
    assert headers[registry.DEAD_LETTER_ORIGIN_HEADER] == f"outbox/{SOURCE}/1".encode()
    assert letter.topic == PAYMENT_TOPIC
    assert 1 in relay.outbox.parked and 1 not in relay.outbox.published
    assert relay.outbox.published == [2]
    assert relay.sample("cake_events_relay_dead_letter_publish_failures_total") == 0


async def test_later_events_of_a_failing_aggregate_wait_until_it_is_dead_lettered() -> None:
    relay = make_relay(payment(1, "TXN-1"), user_login(2), payment(3, "TXN-1"))
    relay.kafka.rejected_types.add(registry.PAYMENT_PROCESSED.name)
    first_id = relay.outbox.rows[1].event_id
    later_id = relay.outbox.rows[3].event_id

    await relay.run_until_idle()

    # Row 3 (same aggregate as the failing row 1) is never sent before row 1 is given up
    # on, and then it fails for itself too; the other aggregate is not held back at all.
    assert relay.outbox.published == [2]
    assert set(relay.outbox.parked) == {1, 3}
    copies = relay.kafka.event_ids(registry.PAYMENT_PROCESSED.dead_letter_topic)
    assert copies == [first_id, later_id]
    retried_rows = [r.row_id for r in relay.outbox.retries]
    assert retried_rows.index(3) > retried_rows.index(1)
    assert relay.kafka.event_ids(USER_TOPIC) == [relay.outbox.rows[2].event_id]


# -- Kafka away ------------------------------------------------------------------------------


async def test_while_kafka_is_down_nothing_is_claimed_and_no_attempt_is_counted() -> None:
    relay = make_relay(user_login(1))
    relay.kafka.up = False
    stop = asyncio.Event()
    running = asyncio.create_task(relay.relay.run(stop))
    await asyncio.wait_for(relay.kafka.refused_thrice.wait(), 5)

    assert relay.outbox.claims == []
    assert relay.kafka.acknowledged == []
    relay.kafka.up = True
    await asyncio.wait_for(relay.outbox.idle.wait(), 5)
    stop.set()
    await running

    assert relay.outbox.published == [1]
    assert relay.outbox.retries == []
    assert relay.kafka.topics() == [USER_TOPIC]


async def test_a_broker_lost_mid_batch_resets_the_producer_and_sends_again_uncounted() -> None:
    rows = [user_login(1, user_id=1), user_login(2, user_id=2)]
    relay = make_relay(*rows)
    relay.kafka.connection_lost_once.add(rows[1].event_id)

    await relay.run_until_idle()

    assert relay.kafka.resets == 1
    assert relay.sample("cake_events_relay_kafka_unavailable_total") == 1
    assert sorted(relay.outbox.published) == [1, 2]
    assert relay.kafka.event_ids(USER_TOPIC) == [rows[0].event_id, rows[1].event_id]
    # A broker outage is not the event's fault: no attempt, no retry delay, no dead letter.
    assert relay.outbox.retries == []
    assert relay.database.dead_letters == []


async def test_a_standby_stopped_before_leading_publishes_nothing_and_closes_its_producer() -> None:
    relay = make_relay(user_login(1))
    stop = asyncio.Event()
    stop.set()

    await relay.relay.run(stop)

    assert relay.outbox.claims == []
    assert relay.kafka.closed == 1
    assert not relay.relay.is_active


# -- per-partition batches -------------------------------------------------------------------


async def test_offsets_are_the_batch_base_offset_plus_the_index_across_batch_boundaries() -> None:
    rows = [user_login(i, user_id=7 if i % 2 else 8) for i in range(1, 8)]
    relay = make_relay(*rows)
    relay.kafka.partitions = 2
    relay.kafka.batch_capacity = 2

    await relay.run_until_idle()

    [batch] = relay.database.batches
    assert batch.event_ids == [row.event_id for row in rows]
    # Users 7 and 8 land on their own partitions, each filled by batches of two.
    partition_of = {b"7": sum(b"7") % 2, b"8": sum(b"8") % 2}
    assert sorted(set(partition_of.values())) == [0, 1]
    assert [len(b.messages) for b in relay.kafka.handed_over] == [2, 2, 2, 1]
    for event_id, partition, offset in zip(
        batch.event_ids, batch.partitions, batch.offsets, strict=True
    ):
        message = relay.kafka.logs[USER_TOPIC, partition][offset]
        assert dict(message.headers)[registry.EVENT_ID_HEADER].decode() == event_id
    for user, partition in partition_of.items():
        log = relay.kafka.logs[USER_TOPIC, partition]
        expected = [r.event_id for r in rows if r.aggregate_id.encode() == user]
        assert [dict(m.headers)[registry.EVENT_ID_HEADER].decode() for m in log] == expected


async def test_a_batch_kafka_fails_fails_all_its_rows_which_are_retried_in_order() -> None:
    rows = [user_login(1, user_id=1), user_login(2, user_id=2), user_login(3, user_id=1)]
    relay = make_relay(*rows)
    relay.kafka.failed_once.add(rows[1].event_id)

    await relay.run_until_idle()

    # The one batch failed: each of its rows counts an attempt and is retried.
    assert sorted((r.row_id, r.attempts) for r in relay.outbox.retries) == [
        (1, 1),
        (2, 1),
        (3, 1),
    ]
    assert "CorruptRecordException" in relay.outbox.retries[0].error
    assert sorted(relay.outbox.published) == [1, 2, 3]
    assert relay.kafka.event_ids(USER_TOPIC) == [row.event_id for row in rows]
    assert relay.kafka.resets == 0
    assert relay.sample("cake_events_relay_failed_attempts_total", topic=USER_TOPIC) == 3
    assert relay.sample("cake_events_relay_order_broken_total") == 0


async def test_kafka_failing_a_batch_and_taking_the_next_of_its_partition_is_counted() -> None:
    rows = [user_login(i, user_id=1) for i in range(1, 5)]
    relay = make_relay(*rows)
    relay.kafka.batch_capacity = 2
    relay.kafka.failed_once.add(rows[0].event_id)

    await relay.run_until_idle()

    # Rows 3 and 4 (second batch) were acknowledged after rows 1 and 2 failed: the one
    # overtaking the relay cannot prevent, reported for the aggregate.
    assert relay.sample("cake_events_relay_order_broken_total") == 1
    assert sorted(relay.outbox.published) == [1, 2, 3, 4]
    assert [r.row_id for r in relay.outbox.retries] == [1, 2]


async def test_kafka_lost_while_a_full_batch_is_handed_over_leaves_every_row_waiting() -> None:
    rows = [user_login(i, user_id=i) for i in range(1, 6)]
    relay = make_relay(*rows)
    relay.kafka.batch_capacity = 2
    relay.kafka.lost_on_hand_over = 1

    await relay.run_until_idle()

    # The first full batch could not be handed over: nothing more was, the producer was
    # reset, and every row went out later without an attempt counted.
    assert relay.kafka.resets == 1
    assert relay.sample("cake_events_relay_kafka_unavailable_total") == 1
    assert relay.outbox.retries == [] and relay.database.dead_letters == []
    assert sorted(relay.outbox.published) == [1, 2, 3, 4, 5]
    assert relay.kafka.event_ids(USER_TOPIC) == [row.event_id for row in rows]


async def test_a_message_too_large_on_its_own_does_not_hold_back_its_batch() -> None:
    rows = [user_login(1, user_id=1), payment(2, "TXN-1"), user_login(3, user_id=2)]
    relay = make_relay(*rows)
    relay.kafka.rejected_types.add(registry.PAYMENT_PROCESSED.name)

    await relay.run_until_idle()

    # Refused before anything was sent: only that row is retried (then dead-lettered).
    assert {r.row_id for r in relay.outbox.retries} == {2}
    assert set(relay.outbox.parked) == {2}
    assert relay.outbox.published == [1, 3]
    assert relay.kafka.event_ids(USER_TOPIC) == [rows[0].event_id, rows[2].event_id]
