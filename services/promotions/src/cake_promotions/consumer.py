"""The first-login consumer: auth's USER_FIRST_LOGIN events become enrolments.

Each poll batch (up to ``max_batch`` records, from every partition assigned) is applied in
ONE database transaction (``FirstLoginEnrolment.enrol_batch``, docs/enrolment.md): the
inbox, the slots, the participations, the vouchers and the outbox events of the whole batch.
Delivery is at-least-once (Kafka, the relay); the effect is exactly-once because every event
id goes into the inbox in the same transaction as its enrolment. Offsets are committed only
after that transaction commits, so a crash before the commit means redelivery, never loss.

- A dependency outage (PostgreSQL down) is retried with capped exponential backoff, as long
  as it lasts, without committing: the partition simply waits.
- An event that can never be processed (undecodable, invalid, of an unexpected type, or
  failing with an unexpected error several times) goes to ``<topic>.dlq`` with the reason in
  a header, is counted, and its offset committed, so one bad event never blocks the ones
  behind it. A batch that fails with an unexpected error is applied again one event at a
  time, so such an event is found and parked while the others go through.

One user's events (keyed by user id) share a partition and keep their order in the batch;
the enrolment decides them in login-time order.

The consumer is isolated from the API it runs next to: if its loop dies of any error (a bug,
an unexpected library error), it is restarted after a jittered exponential backoff, and its
health component (``kafka_consumer``, not critical) reads NOT_SERVING until it consumes
again, so the service reports itself degraded and keeps serving gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg
import sqlalchemy.exc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition
from cake.events.v1 import envelope_pb2, payloads_pb2, registry
from cake_common.kafka import (
    create_consumer,
    create_producer,
    start_span_from_headers,
    start_with_retry,
)
from cake_common.logging import get_logger
from cake_common.tracing import current_traceparent
from cake_common.validation import RequestValidator
from google.protobuf.message import DecodeError, Message

from cake_promotions.domain.enrolment import EnrolmentOutcome, FirstLogin
from cake_promotions.metrics import PromotionsMetrics
from cake_promotions.service.enrolment import FirstLoginEnrolment

USER_FIRST_LOGIN = registry.USER_FIRST_LOGIN.name
DLQ_REASON_HEADER = registry.DEAD_LETTER_REASON_HEADER
DLQ_ORIGIN_HEADER = registry.DEAD_LETTER_ORIGIN_HEADER

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
    psycopg.OperationalError,
    ConnectionError,
    TimeoutError,
    OSError,
)

_log = get_logger(__name__)


class PoisonEvent(Exception):  # noqa: N818 - a property of the event, not a failure here
    """An event this consumer can never process, whatever is retried.

    ``kind`` is a short fixed label (metrics); ``detail`` says what exactly (logs, headers).
    """

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class FirstLoginEvent:
    event_id: UUID
    user_id: int
    login_at: datetime


_CONTRACT = RequestValidator()
"""The ``buf.validate`` rules of the envelope and payload (protovalidate, built on first use)."""


def _contract_violations(message: Message) -> str | None:
    """What breaks the message's ``buf.validate`` rules, in one line; None if nothing."""
    violations = _CONTRACT.violations(message)
    if not violations:
        return None
    return "; ".join(f"{v.field}: {v.description}" for v in violations)[:500]


def decode_first_login(value: bytes | None) -> FirstLoginEvent:
    """The USER_FIRST_LOGIN event in a Kafka message value; ``PoisonEvent`` if it is not one.

    The envelope and the payload must keep the contract's ``buf.validate`` rules
    (``cake/events/v1``), checked with protovalidate like every gRPC request.
    """
    if not value:
        raise PoisonEvent("empty", "the message has no value")
    try:
        envelope = envelope_pb2.EventEnvelope.FromString(value)
    except DecodeError:
        raise PoisonEvent("undecodable", "not an EventEnvelope") from None
    if envelope.type != USER_FIRST_LOGIN:
        raise PoisonEvent("unexpected_type", f"event type {envelope.type[:64]!r}")
    broken = _contract_violations(envelope)
    if broken is not None:
        raise PoisonEvent("invalid_envelope", broken)
    payload = payloads_pb2.UserFirstLogin()
    try:
        unpacked = envelope.payload.Unpack(payload)
    except DecodeError:
        raise PoisonEvent("invalid_payload", "undecodable UserFirstLogin") from None
    if not unpacked:
        raise PoisonEvent("wrong_payload", f"payload type {envelope.payload.type_url[:100]}")
    broken = _contract_violations(payload)
    if broken is not None:
        raise PoisonEvent("invalid_payload", broken)
    return FirstLoginEvent(
        event_id=UUID(envelope.event_id),  # a UUID: the contract says so, checked above
        user_id=payload.user_id,
        login_at=payload.login_at.ToDatetime(tzinfo=UTC),
    )


class FirstLoginConsumer:
    def __init__(
        self,
        enrolment: FirstLoginEnrolment,
        metrics: PromotionsMetrics,
        *,
        bootstrap_servers: str,
        topic: str,
        group_id: str,
        client_id: str,
        max_batch: int = 500,
        retry_max_seconds: float = 10.0,
        unexpected_error_attempts: int = 3,
        restart_base_seconds: float = 0.5,
    ) -> None:
        self._enrolment = enrolment
        self._restart_base_seconds = restart_base_seconds
        self.restarts = 0
        """How many times the loop died and was restarted."""
        self._metrics = metrics
        self._bootstrap_servers = bootstrap_servers
        self._topic = topic
        self._dlq_topic = registry.dead_letter_topic_for(topic)
        self._group_id = group_id
        self._client_id = client_id
        self._max_batch = max_batch
        self._retry_max_seconds = retry_max_seconds
        self._unexpected_error_attempts = unexpected_error_attempts
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, on_failure: Callable[[BaseException], None] | None = None) -> None:
        """Consume in a background task, restarting it whenever it dies of an error;
        ``on_failure`` is called only if the supervision itself fails."""
        if self._task is not None:
            return
        self._task = asyncio.create_task(
            self._supervise(), name="cake-promotions-first-login-consumer"
        )

        def report(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and (error := task.exception()) is not None:
                _log.error("first-login consumer died", error=repr(error))
                if on_failure is not None:
                    on_failure(error)

        self._task.add_done_callback(report)

    async def stop(self, timeout_seconds: float = 10.0) -> None:
        """Finish the event in hand, commit what is done and leave the group."""
        self._stopping.set()
        if self._task is None:
            return
        done, _ = await asyncio.wait({self._task}, timeout=timeout_seconds)
        if not done:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait(self) -> None:
        """Until the consumer has stopped."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)

    async def is_consuming(self) -> bool:
        """Health probe: the Kafka clients are up and the loop is running."""
        return (
            self._consumer is not None
            and self._producer is not None
            and self._task is not None
            and not self._task.done()
        )

    async def _supervise(self) -> None:
        """Run the loop until stopped; after a failure, close the clients, wait a jittered
        backoff (full jitter, capped at ``retry_max_seconds``) and start again."""
        failures = 0
        while not self._stopping.is_set():
            started = asyncio.get_running_loop().time()
            try:
                await self._run()
            except Exception as error:
                if asyncio.get_running_loop().time() - started > self._retry_max_seconds:
                    failures = 0  # it had been working: start the backoff over
                failures += 1
                self.restarts += 1
                self._metrics.consumer_restarts.inc()
                cap = min(self._restart_base_seconds * 2**failures, self._retry_max_seconds)
                delay = random.uniform(cap / 2, cap)  # noqa: S311 - jitter, not a secret
                _log.exception(
                    "first-login consumer failed, restarting",
                    error=repr(error),
                    restart_in_seconds=round(delay, 2),
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=delay)
            else:
                return

    async def _run(self) -> None:
        try:
            self._consumer = await self._start_client(
                lambda: create_consumer(
                    self._bootstrap_servers,
                    [self._topic],
                    self._group_id,
                    self._client_id,
                    max_poll_records=self._max_batch,
                )
            )
            if self._consumer is None:
                return
            self._producer = await self._start_client(
                lambda: create_producer(self._bootstrap_servers, f"{self._client_id}-dlq")
            )
            if self._producer is None:
                return
            _log.info("first-login consumer started", topic=self._topic, group=self._group_id)
            while not self._stopping.is_set():
                await self._consume_batch(self._consumer)
        finally:
            await self._close_clients()

    async def _start_client(self, factory: Callable[[], Any]) -> Any:
        """Start a Kafka client, retrying for as long as Kafka is unreachable (Kafka is not
        critical to the service: gRPC serves meanwhile); ``None`` if stopped first."""
        while not self._stopping.is_set():
            try:
                return await start_with_retry(factory, timeout_seconds=self._retry_max_seconds)
            except (KafkaError, OSError, TimeoutError) as error:
                _log.warning("kafka unreachable, consumer still waiting", error=repr(error))
        return None

    async def _close_clients(self) -> None:
        for client in (self._consumer, self._producer):
            if client is None:
                continue
            try:
                await client.stop()
            except Exception as error:
                _log.warning("closing a kafka client failed", error=repr(error))
        self._consumer = self._producer = None
        _log.info("first-login consumer stopped")

    # -- consuming ------------------------------------------------------------------------

    async def _consume_batch(self, consumer: AIOKafkaConsumer) -> None:
        batches = await consumer.getmany(timeout_ms=500, max_records=self._max_batch)
        records = [record for partition in batches for record in batches[partition]]
        if not records or not await self._handle(records):
            return
        offsets = {
            partition: partition_records[-1].offset + 1
            for partition, partition_records in batches.items()
            if partition_records
        }
        await self._commit(consumer, offsets)

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except KafkaError as error:
            # A rebalance moved the partitions away: their new owner gets the events again
            # and the inbox makes the repeat a no-op.
            _log.warning("offset commit failed, events will be redelivered", error=repr(error))

    async def _handle(self, records: Sequence[ConsumerRecord[Any, Any]]) -> bool:
        """Apply a poll batch (and dead-letter what cannot be decoded); False if given up
        because of a stop, then nothing of it is committed and all of it comes again."""
        events: list[tuple[ConsumerRecord[Any, Any], FirstLoginEvent]] = []
        poison: list[tuple[ConsumerRecord[Any, Any], PoisonEvent]] = []
        for record in records:
            try:
                events.append((record, decode_first_login(record.value)))
            except PoisonEvent as bad:
                poison.append((record, bad))
        if events and not await self._apply(events):
            return False
        for record, reason in poison:
            if not await self._dead_letter(record, reason):
                return False
        return True

    async def _apply(
        self, events: Sequence[tuple[ConsumerRecord[Any, Any], FirstLoginEvent]]
    ) -> bool:
        """Enrol the batch in one transaction, retrying while a dependency is down; after an
        unexpected error, one event at a time (so a bad one is parked, not the batch)."""
        failures = 0
        while not self._stopping.is_set():
            try:
                outcomes = await self._enrol(events)
            except TRANSIENT_ERRORS as error:
                failures += 1
                self._metrics.consumer_retries.labels(kind="transient").inc()
                _log.warning(
                    "first-login batch not applied, retrying",
                    events=len(events),
                    attempt=failures,
                    error=repr(error),
                )
                await self._backoff(failures)
                continue
            except Exception:
                self._metrics.consumer_retries.labels(kind="unexpected").inc()
                if len(events) == 1:
                    _log.exception("first-login event failed", event_id=str(events[0][1].event_id))
                    return await self._apply_alone(events[0], failures=failures + 1, unexpected=1)
                _log.exception("first-login batch failed, applying its events one by one")
                for event in events:
                    if not await self._apply_alone(event, failures=0, unexpected=0):
                        return False
                return True
            self._count(outcomes)
            return True
        return False

    async def _apply_alone(
        self,
        event: tuple[ConsumerRecord[Any, Any], FirstLoginEvent],
        *,
        failures: int,
        unexpected: int,
    ) -> bool:
        """One event in its own transaction: retried while a dependency is down,
        dead-lettered after ``unexpected_error_attempts`` unexpected errors (counting the
        ``unexpected`` ones it already had)."""
        record, decoded = event
        while not self._stopping.is_set():
            if unexpected >= self._unexpected_error_attempts:
                return await self._dead_letter(
                    record, PoisonEvent("processing_failed", "failed repeatedly, see the logs")
                )
            if failures:
                await self._backoff(failures)
                if self._stopping.is_set():
                    break
            try:
                outcomes = await self._enrol([event])
            except TRANSIENT_ERRORS as error:
                failures += 1
                self._metrics.consumer_retries.labels(kind="transient").inc()
                _log.warning(
                    "first-login event not applied, retrying",
                    event_id=str(decoded.event_id),
                    attempt=failures,
                    error=repr(error),
                )
            except Exception as error:
                failures += 1
                unexpected += 1
                self._metrics.consumer_retries.labels(kind="unexpected").inc()
                _log.exception("first-login event failed", event_id=str(decoded.event_id))
                if unexpected >= self._unexpected_error_attempts:
                    return await self._dead_letter(
                        record, PoisonEvent("processing_failed", repr(error)[:200])
                    )
            else:
                self._count(outcomes)
                return True
        return False

    async def _enrol(
        self, events: Sequence[tuple[ConsumerRecord[Any, Any], FirstLoginEvent]]
    ) -> list[EnrolmentOutcome | None]:
        # One span per event continuing its login's trace (relay -> Kafka headers), open
        # around the batch's transaction; each event's outbox rows carry its own span on.
        with contextlib.ExitStack() as spans:
            trace_parents = []
            for record, _ in events:
                spans.enter_context(
                    start_span_from_headers(
                        "promotions enrol first login",
                        record.headers,
                        attributes={"messaging.destination.name": record.topic},
                    )
                )
                trace_parents.append(current_traceparent())
            return await self._enrolment.enrol_batch(
                [FirstLogin(event.user_id, event.login_at, event.event_id) for _, event in events],
                trace_parents=trace_parents,
            )

    def _count(self, outcomes: Sequence[EnrolmentOutcome | None]) -> None:
        for outcome in outcomes:
            result = "duplicate" if outcome is None else outcome.result.value
            self._metrics.consumed_events.labels(result=result).inc()

    async def _backoff(self, failures: int) -> None:
        delay = min(0.1 * 2 ** min(failures, 16), self._retry_max_seconds)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=delay)

    async def _dead_letter(self, record: ConsumerRecord[Any, Any], poison: PoisonEvent) -> bool:
        """Park the record on the dead-letter topic (retrying while Kafka is down)."""
        headers = [
            *(record.headers or ()),
            (DLQ_REASON_HEADER, str(poison).encode()),
            (DLQ_ORIGIN_HEADER, f"{record.topic}/{record.partition}/{record.offset}".encode()),
        ]
        failures = 0
        while not self._stopping.is_set():
            assert self._producer is not None
            try:
                await self._producer.send_and_wait(
                    self._dlq_topic, value=record.value, key=record.key, headers=headers
                )
            except KafkaError as error:
                failures += 1
                _log.warning("dead-lettering failed, retrying", error=repr(error))
                await self._backoff(failures)
                continue
            self._metrics.dead_letters.labels(reason=poison.kind).inc()
            self._metrics.consumed_events.labels(result="dead_lettered").inc()
            _log.error(
                "event dead-lettered",
                reason=str(poison),
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
            )
            return True
        return False
