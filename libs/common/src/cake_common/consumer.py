"""The Kafka consumer of every service: handlers register per event type, the rest is here.

A service builds one :class:`EventConsumer` in its composition root and registers one
handler per event type it consumes (``consumer.register(registry.X, handler)``); the handler
receives a batch of decoded events of that type and applies them in ONE unit of work, with
the inbox of exactly-once effects inside it. This module does everything around it:

- the aiokafka poll loop: a poll batch (up to ``max_batch`` records, every partition
  assigned) is decoded, split by event type (order kept), each type's events handed to its
  handler; offsets are committed only after every handler returned, i.e. after the effects
  are durable. A crash before the commit means redelivery, never loss; the inbox makes the
  redelivery a no-op. The commit runs while the next batch is fetched and applied (one
  commit at a time, in order, awaited before the next one and before the clients close):
  waiting for it before polling again added a broker round trip to every batch.
- decoding through the event registry (``cake.events.v1.registry``): envelope, event type,
  typed payload, the ``buf.validate`` rules of both. A record that breaks its contract is a
  :class:`PoisonEvent`: it goes to the registry's dead-letter topic of its topic, with the
  registry's reason and origin headers, is counted, and its offset committed, so it never
  blocks the partition. An event type the registry publishes on the topic but that no
  handler here takes is skipped (another service's business).
- one retry policy (:class:`cake_common.retry.RetryPolicy`, shared with start-up): a
  batch failing with a transient error (database or Kafka down) is retried as long as the
  outage lasts without committing; a batch failing with an unexpected error is applied
  again one event at a time, and an event failing ``unexpected_error_attempts`` times is
  dead-lettered, so one bad event is parked while the others go through.
- supervised restart: a loop that dies of any error is restarted after the policy's
  backoff (its health probe :meth:`EventConsumer.is_consuming` reads False meanwhile); a
  fatal error (:data:`FATAL_ERRORS`, e.g. :class:`FatalConsumerError` raised by a handler)
  stops it for good with one critical log line, and ``on_failure`` lets the composition
  root stop the process.

Metrics (:class:`ConsumerMetrics`) are named after the service:
``cake_<service>_consumed_events_total{result}``, ``..._consumer_retries_total{kind}``,
``..._consumer_restarts_total`` and ``..._dead_letters_total{reason}``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeAlias, TypeVar
from uuid import UUID

import psycopg
import sqlalchemy.exc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    KafkaError,
    TopicAuthorizationFailedError,
)
from aiokafka.structs import ConsumerRecord, TopicPartition
from cake.events.v1 import envelope_pb2, registry
from google.protobuf.message import DecodeError, Message
from prometheus_client import REGISTRY, CollectorRegistry, Counter

from cake_common.kafka import (
    create_consumer,
    create_producer,
    start_span_from_headers,
    start_with_retry,
)
from cake_common.logging import get_logger
from cake_common.retry import RetryPolicy
from cake_common.tracing import current_traceparent
from cake_common.validation import RequestValidator

_Payload = TypeVar("_Payload", bound=Message)

Record: TypeAlias = ConsumerRecord[Any, Any]

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
    psycopg.OperationalError,
    OSError,  # ConnectionError included
    TimeoutError,
    KafkaError,
)
"""Errors of a dependency being down: retried, as long as it lasts, without committing."""


class FatalConsumerError(Exception):
    """Raised (by a handler or the consumer) when consuming cannot go on in this process:
    no restart helps (a misconfiguration, a schema this code does not know)."""


FATAL_ERRORS: tuple[type[BaseException], ...] = (
    FatalConsumerError,
    TopicAuthorizationFailedError,
    GroupAuthorizationFailedError,
)
"""Errors that stop the consumer for good instead of restarting it."""

_log = get_logger(__name__)


class ConsumerMetrics:
    """The consumer's Prometheus counters, named ``cake_<service>_...``; built by the
    composition root (or a test, on a private registry), never at import time."""

    def __init__(self, service: str, registry: CollectorRegistry = REGISTRY) -> None:
        prefix = f"cake_{service}"
        self.consumed_events = Counter(
            f"{prefix}_consumed_events_total",
            "Events read by the Kafka consumer by outcome (the handler's, or duplicate,"
            " dead_lettered, skipped: an event type no handler here takes)",
            ["result"],
            registry=registry,
        )
        self.consumer_retries = Counter(
            f"{prefix}_consumer_retries_total",
            "Attempts at an event that failed and will be retried (transient: a dependency"
            " is down; unexpected: a bug or bad data, dead-lettered after a few)",
            ["kind"],
            registry=registry,
        )
        self.consumer_restarts = Counter(
            f"{prefix}_consumer_restarts_total",
            "Times the Kafka consumer loop died of an error and was restarted",
            registry=registry,
        )
        self.dead_letters = Counter(
            f"{prefix}_dead_letters_total",
            "Events the Kafka consumer could never process, sent to the dead-letter topic",
            ["reason"],
            registry=registry,
        )


# -- decoding (pure) ---------------------------------------------------------------------


class PoisonEvent(Exception):  # noqa: N818 - a property of the event, not a failure here
    """A record the consumer can never process, whatever is retried.

    ``kind`` is a short fixed label (metrics); ``detail`` says what exactly (logs, headers).
    """

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ConsumedEvent(Generic[_Payload]):
    """One decoded event, as a handler receives it."""

    event_id: UUID
    """The envelope's event id: the inbox key of exactly-once effects."""
    payload: _Payload
    """The typed payload (the registry's payload message of the event type)."""
    envelope: envelope_pb2.EventEnvelope
    trace_parent: str | None = None
    """W3C traceparent of the consumer span open around the handler for this event (its
    outbox rows carry it on); None outside that span (e.g. in unit tests)."""


_CONTRACT = RequestValidator()
"""The ``buf.validate`` rules of the envelope and payload (protovalidate, built on first use)."""


def _contract_violations(message: Message) -> str | None:
    """What breaks the message's ``buf.validate`` rules, in one line; None if nothing."""
    violations = _CONTRACT.violations(message)
    if not violations:
        return None
    return "; ".join(f"{v.field}: {v.description}" for v in violations)[:500]


def decode_envelope(value: bytes | None) -> envelope_pb2.EventEnvelope:
    """The envelope in a Kafka message value (not yet validated); ``PoisonEvent`` if none."""
    if not value:
        raise PoisonEvent("empty", "the message has no value")
    try:
        return envelope_pb2.EventEnvelope.FromString(value)
    except DecodeError:
        raise PoisonEvent("undecodable", "not an EventEnvelope") from None


def decode_payload(
    envelope: envelope_pb2.EventEnvelope, spec: registry.EventSpec[_Payload]
) -> ConsumedEvent[_Payload]:
    """The event of type ``spec`` in ``envelope``, envelope and payload checked against the
    contract's ``buf.validate`` rules; ``PoisonEvent`` if it breaks them."""
    broken = _contract_violations(envelope)
    if broken is not None:
        raise PoisonEvent("invalid_envelope", broken)
    payload = spec.payload()
    try:
        unpacked = envelope.payload.Unpack(payload)
    except DecodeError:
        raise PoisonEvent("invalid_payload", f"undecodable {spec.payload.__name__}") from None
    if not unpacked:
        raise PoisonEvent("wrong_payload", f"payload type {envelope.payload.type_url[:100]}")
    broken = _contract_violations(payload)
    if broken is not None:
        raise PoisonEvent("invalid_payload", broken)
    # A UUID: the envelope's contract says so, checked above.
    return ConsumedEvent(UUID(envelope.event_id), payload, envelope)


Handler = Callable[[Sequence[ConsumedEvent[_Payload]]], Awaitable[Sequence[str]]]
"""Applies a batch of events of one type in one unit of work (inbox included) and returns
one outcome label per event, in order (``consumed_events_total{result}``; ``"duplicate"``
for an event the inbox had already seen)."""


@dataclass(frozen=True, slots=True)
class Route:
    """Where the events of one type on one topic go."""

    spec: registry.EventSpec[Any]
    handler: Handler[Any]
    span_name: str


@dataclass(frozen=True, slots=True)
class Delivery:
    """A decoded event and the record that carried it."""

    record: Record
    event: ConsumedEvent[Any]


@dataclass(slots=True)
class SortedBatch:
    """A poll batch sorted out: each type's events for its handler, the poison, the skipped."""

    groups: list[tuple[Route, list[Delivery]]] = field(default_factory=list)
    poison: list[tuple[Record, PoisonEvent]] = field(default_factory=list)
    skipped: int = 0


@dataclass(frozen=True, slots=True)
class Routes:
    """The handlers by topic and event type, and the event types each topic carries."""

    by_topic: Mapping[str, Mapping[str, Route]]
    carried: Mapping[str, frozenset[str]]
    """Per topic, the event types the registry publishes on it (the contract topic's)."""

    def sort(self, records: Sequence[Record]) -> SortedBatch:
        """Decode a poll batch and group its events by type, in order of first appearance
        (one user's events keep their partition order within their type)."""
        batch = SortedBatch()
        groups: dict[str, tuple[Route, list[Delivery]]] = {}
        for record in records:
            routes = self.by_topic.get(record.topic, {})
            try:
                envelope = decode_envelope(record.value)
                route = routes.get(envelope.type)
                if route is None:
                    if envelope.type in self.carried.get(record.topic, frozenset()):
                        batch.skipped += 1
                        continue
                    raise PoisonEvent("unexpected_type", f"event type {envelope.type[:64]!r}")
                event = decode_payload(envelope, route.spec)
            except PoisonEvent as bad:
                batch.poison.append((record, bad))
                continue
            group = groups.get(route.spec.name)
            if group is None:
                group = groups[route.spec.name] = (route, [])
                batch.groups.append(group)
            group[1].append(Delivery(record, event))
        return batch


def dead_letter_headers(record: Record, poison: PoisonEvent) -> list[tuple[str, bytes]]:
    """The record's headers plus the registry's reason and origin headers."""
    return [
        *(record.headers or ()),
        (registry.DEAD_LETTER_REASON_HEADER, str(poison).encode()),
        (
            registry.DEAD_LETTER_ORIGIN_HEADER,
            f"{record.topic}/{record.partition}/{record.offset}".encode(),
        ),
    ]


def commit_offsets(batches: Mapping[TopicPartition, Sequence[Record]]) -> dict[TopicPartition, int]:
    """The offsets to commit once a poll batch is done: each partition's last offset + 1."""
    return {partition: records[-1].offset + 1 for partition, records in batches.items() if records}


# -- the loop ------------------------------------------------------------------------------


class EventConsumer:
    """One consumer group's loop; register handlers, then :meth:`start` it."""

    def __init__(
        self,
        *,
        name: str,
        metrics: ConsumerMetrics,
        bootstrap_servers: str,
        group_id: str,
        client_id: str,
        max_batch: int = 500,
        retry: RetryPolicy | None = None,
        unexpected_error_attempts: int = 3,
        transient_errors: tuple[type[BaseException], ...] = TRANSIENT_ERRORS,
        fatal_errors: tuple[type[BaseException], ...] = FATAL_ERRORS,
    ) -> None:
        self.name = name
        self._metrics = metrics
        self._bootstrap_servers = bootstrap_servers
        self._group_id = group_id
        self._client_id = client_id
        self._max_batch = max_batch
        self._retry = retry or RetryPolicy()
        self._unexpected_error_attempts = unexpected_error_attempts
        self._transient = transient_errors
        self._fatal = fatal_errors
        self._routes: dict[str, dict[str, Route]] = {}
        self._carried: dict[str, frozenset[str]] = {}
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._committing: asyncio.Task[None] | None = None
        """The previous batch's offset commit, still running."""

    def register(
        self,
        spec: registry.PublishedEvent[_Payload],
        handler: Handler[_Payload],
        *,
        topic: str | None = None,
        span_name: str | None = None,
    ) -> None:
        """Hand the events of type ``spec`` to ``handler``, read from the registry's topic
        (or ``topic``: a test's, a renamed one; its dead letters go to the registry's
        dead-letter topic of it). ``span_name`` names the consumer span of each event."""
        if self._task is not None:
            raise RuntimeError("register handlers before starting the consumer")
        source = topic or spec.topic
        routes = self._routes.setdefault(source, {})
        if spec.name in routes:
            raise ValueError(f"{spec.name} on {source} already has a handler")
        routes[spec.name] = Route(spec, handler, span_name or f"{self.name} {spec.name}")
        self._carried[source] = self._carried.get(source, frozenset()) | {
            published.name for published in registry.PUBLISHED if published.topic == spec.topic
        }

    @property
    def topics(self) -> list[str]:
        return sorted(self._routes)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, on_failure: Callable[[BaseException], None] | None = None) -> None:
        """Consume in a background task, restarting it whenever it dies of an error;
        ``on_failure`` is called if it stops for good (a fatal error)."""
        if self._task is not None:
            return
        if not self._routes:
            raise RuntimeError("no handler registered")
        self._task = asyncio.create_task(self._supervise(), name=f"cake-{self.name}-consumer")

        def report(task: asyncio.Task[None]) -> None:
            if on_failure is None or task.cancelled():
                return
            if (error := task.exception()) is not None:
                on_failure(error)

        self._task.add_done_callback(report)

    async def stop(self, timeout_seconds: float = 10.0) -> None:
        """Finish the batch in hand, commit what is done and leave the group."""
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
        """Run the loop until stopped; after a failure, close the clients, wait the retry
        policy's backoff and start again; a fatal error ends it (re-raised)."""
        failures = 0
        while not self._stopping.is_set():
            started = asyncio.get_running_loop().time()
            try:
                await self._run()
            except self._fatal as error:
                _log.critical(
                    "kafka consumer stopped by a fatal error; the process must stop",
                    consumer=self.name,
                    error=repr(error),
                )
                raise
            except Exception as error:
                if asyncio.get_running_loop().time() - started > self._retry.max_seconds:
                    failures = 0  # it had been working: start the backoff over
                failures += 1
                self._metrics.consumer_restarts.inc()
                delay = self._retry.delay(failures)
                _log.exception(
                    "kafka consumer failed, restarting",
                    consumer=self.name,
                    error=repr(error),
                    restart_in_seconds=round(delay, 2),
                )
                await self._sleep(delay)
            else:
                return

    async def _run(self) -> None:
        try:
            self._consumer = await self._start_client(
                lambda: create_consumer(
                    self._bootstrap_servers,
                    self.topics,
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
            _log.info(
                "kafka consumer started",
                consumer=self.name,
                topics=self.topics,
                group=self._group_id,
            )
            while not self._stopping.is_set():
                await self._consume_batch(self._consumer)
        finally:
            await self._committed()
            await self._close_clients()

    async def _start_client(self, factory: Callable[[], Any]) -> Any:
        """Start a Kafka client, retrying for as long as Kafka is unreachable (a service
        keeps serving meanwhile); ``None`` if stopped first."""
        while not self._stopping.is_set():
            try:
                return await start_with_retry(factory, timeout_seconds=self._retry.max_seconds)
            except self._fatal:
                raise
            except (KafkaError, OSError, TimeoutError) as error:
                _log.warning(
                    "kafka unreachable, consumer still waiting",
                    consumer=self.name,
                    error=repr(error),
                )
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
        _log.info("kafka consumer stopped", consumer=self.name)

    async def _sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less if stopped meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    # -- consuming ------------------------------------------------------------------------

    async def _consume_batch(self, consumer: AIOKafkaConsumer) -> None:
        batches = await consumer.getmany(timeout_ms=500, max_records=self._max_batch)
        records = [record for partition in batches for record in batches[partition]]
        if not records or not await self._handle(records):
            return
        offsets = commit_offsets(batches)
        if not offsets:
            return
        await self._committed()  # in order: an earlier batch's commit never lands last
        self._committing = asyncio.create_task(self._commit(consumer, offsets))

    async def _committed(self) -> None:
        """Until the previous batch's commit is done (its failure is logged, not raised)."""
        if self._committing is not None:
            committing, self._committing = self._committing, None
            await committing

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        try:
            await consumer.commit(offsets)
        except Exception as error:
            # A rebalance moved the partitions away (or the client is closing): their owner
            # gets the events again and the inbox makes the repeat a no-op.
            _log.warning("offset commit failed, events will be redelivered", error=repr(error))

    async def _handle(self, records: Sequence[Record]) -> bool:
        """Apply a poll batch (and dead-letter what cannot be decoded); False if given up
        because of a stop, then nothing of it is committed and all of it comes again."""
        batch = Routes(self._routes, self._carried).sort(records)
        for route, deliveries in batch.groups:
            if not await self._apply(route, deliveries):
                return False
        for record, reason in batch.poison:
            if not await self._dead_letter(record, reason):
                return False
        if batch.skipped:
            self._metrics.consumed_events.labels(result="skipped").inc(batch.skipped)
        return True

    async def _apply(self, route: Route, deliveries: Sequence[Delivery]) -> bool:
        """Hand the batch to its handler, retrying while a dependency is down; after an
        unexpected error, one event at a time (so a bad one is parked, not the batch)."""
        failures = 0
        while not self._stopping.is_set():
            try:
                outcomes = await self._call(route, deliveries)
            except self._fatal:
                raise
            except self._transient as error:
                failures += 1
                self._note_transient(route, error, failures, events=len(deliveries))
                await self._sleep(self._retry.delay(failures))
                continue
            except Exception:
                self._metrics.consumer_retries.labels(kind="unexpected").inc()
                if len(deliveries) == 1:
                    _log.exception(
                        "event failed",
                        event_type=route.spec.name,
                        event_id=str(deliveries[0].event.event_id),
                    )
                    return await self._apply_alone(
                        route, deliveries[0], failures=failures + 1, unexpected=1
                    )
                _log.exception(
                    "event batch failed, applying its events one by one",
                    event_type=route.spec.name,
                )
                for delivery in deliveries:
                    if not await self._apply_alone(route, delivery, failures=0, unexpected=0):
                        return False
                return True
            self._count(outcomes)
            return True
        return False

    async def _apply_alone(
        self, route: Route, delivery: Delivery, *, failures: int, unexpected: int
    ) -> bool:
        """One event in its own unit of work: retried while a dependency is down,
        dead-lettered after ``unexpected_error_attempts`` unexpected errors (counting the
        ``unexpected`` ones it already had)."""
        event_id = str(delivery.event.event_id)
        while not self._stopping.is_set():
            if unexpected >= self._unexpected_error_attempts:
                return await self._dead_letter(
                    delivery.record,
                    PoisonEvent("processing_failed", "failed repeatedly, see the logs"),
                )
            if failures:
                await self._sleep(self._retry.delay(failures))
                if self._stopping.is_set():
                    break
            try:
                outcomes = await self._call(route, [delivery])
            except self._fatal:
                raise
            except self._transient as error:
                failures += 1
                self._note_transient(route, error, failures, event_id=event_id)
            except Exception as error:
                failures += 1
                unexpected += 1
                self._metrics.consumer_retries.labels(kind="unexpected").inc()
                _log.exception("event failed", event_type=route.spec.name, event_id=event_id)
                if unexpected >= self._unexpected_error_attempts:
                    return await self._dead_letter(
                        delivery.record, PoisonEvent("processing_failed", repr(error)[:200])
                    )
            else:
                self._count(outcomes)
                return True
        return False

    def _note_transient(
        self, route: Route, error: BaseException, attempt: int, **which: object
    ) -> None:
        self._metrics.consumer_retries.labels(kind="transient").inc()
        _log.warning(
            "events not applied (a dependency is down), retrying",
            event_type=route.spec.name,
            attempt=attempt,
            error=repr(error),
            **which,
        )

    async def _call(self, route: Route, deliveries: Sequence[Delivery]) -> Sequence[str]:
        # One span per event continuing its producer's trace (relay -> Kafka headers), open
        # around the handler's unit of work; each event carries its own span's traceparent.
        with contextlib.ExitStack() as spans:
            events = []
            for delivery in deliveries:
                spans.enter_context(
                    start_span_from_headers(
                        route.span_name,
                        delivery.record.headers,
                        attributes={"messaging.destination.name": delivery.record.topic},
                    )
                )
                events.append(
                    ConsumedEvent(
                        delivery.event.event_id,
                        delivery.event.payload,
                        delivery.event.envelope,
                        current_traceparent(),
                    )
                )
            return await route.handler(events)

    def _count(self, outcomes: Sequence[str]) -> None:
        for outcome in outcomes:
            self._metrics.consumed_events.labels(result=outcome).inc()

    async def _dead_letter(self, record: Record, poison: PoisonEvent) -> bool:
        """Park the record on its dead-letter topic (retrying while Kafka is down)."""
        headers = dead_letter_headers(record, poison)
        failures = 0
        while not self._stopping.is_set():
            assert self._producer is not None
            try:
                await self._producer.send_and_wait(
                    registry.dead_letter_topic_for(record.topic),
                    value=record.value,
                    key=record.key,
                    headers=headers,
                )
            except KafkaError as error:
                failures += 1
                _log.warning("dead-lettering failed, retrying", error=repr(error))
                await self._sleep(self._retry.delay(failures))
                continue
            self._metrics.dead_letters.labels(reason=poison.kind).inc()
            self._metrics.consumed_events.labels(result="dead_lettered").inc()
            _log.error(
                "event dead-lettered",
                consumer=self.name,
                reason=str(poison),
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
            )
            return True
        return False
