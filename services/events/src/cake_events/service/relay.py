"""The transactional-outbox relay: moves one producing service's outbox rows to Kafka.

Ordering across replicas — one active relay per source
------------------------------------------------------
Every replica of the events service runs a relay for each source, but only the one that
holds a session-level ``pg_try_advisory_lock`` on that source's database publishes; the
others stand by and retry the lock every few seconds. When the active replica dies, its
database session ends, Postgres releases the lock and a standby takes over, resuming from
the rows still unpublished (at-least-once: a batch that Kafka acknowledged but that was not
yet marked published is sent again; consumers deduplicate on the event id).

Why not sharding by aggregate id: per-aggregate order needs a single writer per aggregate
at any moment, and with shards that means a shard-assignment protocol (and its rebalancing
races) on top of Postgres. The lock gives the same single-writer guarantee with nothing to
coordinate, the claim, the lock and LISTEN share one database session (the lock cannot be
lost while a claim is still running elsewhere), and one relay is far from the bottleneck:
it moves thousands of events per second, far above Cake's write rate, and the standby
replicas keep it highly available.

Within the active relay, rows are claimed in ``id`` order and one aggregate's
events are never allowed to overtake each other: when a row fails, later rows of its
aggregate are held back for the rest of the batch, and later batches skip them while the
failed row waits for its retry. Only a dead letter releases the aggregate (a poison row
must not block a user's events forever); a retried or replayed event therefore arrives
after newer events of its aggregate. (``id`` order is commit order for the events that
matter: an event caused by another is written by a transaction that started after the
first one committed, so it draws a larger id.) The one overtaking it cannot prevent: Kafka
failing a message after accepting a later one of the same aggregate from the same claim (a
non-retriable broker error on one produce request); it is logged and counted
(``cake_events_relay_order_broken_total``).

Kafka batches
-------------
A claim is handed to Kafka as whole per-partition batches (``EventPublisher.batches``): each
message is appended, in id order, to the open batch of the partition its key (the aggregate
id) hashes to, the partition any Kafka producer picks for that key, so one aggregate's
events share a partition. A batch is handed over as soon as it holds a quarter of the
producer's batch size (so Kafka works while the claim is handed over), the rest when the
claim is handed over; the batches of one partition reach Kafka in the order they were filled (the
producer queues them per partition and has one produce request per partition in flight).
Kafka takes or fails a batch whole: a row's outcome is its batch's, its offset the batch's
base offset plus its index in the batch. A failed batch fails all its rows (each counts an
attempt, as when the broker refused a produce request of single sends), so an aggregate can
only be overtaken across two batches of its partition, Kafka failing one and taking the
next: that is what the order-broken counter counts. A message too large on its own is
refused before anything is sent, and only its row fails (a poison row: retried, then a dead
letter). If a batch cannot be handed over because Kafka is away, nothing more of the claim
is, and its rows wait as for any outage. Dead-letter copies are few and still sent one by one.

Pipeline
--------
Each transaction of the active relay claims batch *k* (``FOR UPDATE SKIP LOCKED``) and,
while Kafka takes batch *k*, records the outcome of batch *k-1* (marks it published,
schedules retries, parks dead letters, writes the audit log, which commits first). Kafka
and the databases thus work at the same time instead of in turns. Batch *k* is sent only
once batch *k-1* is fully acknowledged, the claim skips batch *k-1*'s rows, and the
aggregates that failed in batch *k-1* (not yet recorded) are held back in batch *k*: the
order guarantees above are unchanged. A crash loses nothing: unrecorded rows are simply
published again. The recording is started first and the hand-over to the producer yields
to the event loop every few dozen events, so the databases write, and the producer ships
the batches already full, while the claim is still being handed over. The producer does not
linger: the flush that ends each claim would otherwise wait for a linger timer.

Security audit entries (``SECURITY_AUDIT`` rows) are relayed into the events database, not
to Kafka: the transaction that marks them published adds them to the append-only
``security_audit_events`` table (same order guard, same at-least-once delivery, kept once
per event id).

The claim runs with sorts disabled for the session (see ``LeaderConnection.listen``):
it must walk the unpublished-rows index and stop after one batch, whatever the
statistics say.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import operator
import random as _random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from cake_common.db import is_connection_error
from cake_common.kafka import with_current_trace
from cake_common.logging import get_logger
from cake_common.retry import RetryPolicy, Uniform
from cake_common.tracing import SpanKind, start_span_from_traceparent, tracing_enabled

from cake_events.domain.audit import SECURITY_AUDIT, security_audit_entries
from cake_events.domain.delivery import DeadLetter, PublishedBatch
from cake_events.domain.envelope import EnvelopeBuilder, KafkaMessage
from cake_events.domain.relay import (
    AggregateOrder,
    FailurePolicy,
    OutboxEvent,
    ParkedRow,
    PoisonEvent,
    ScheduledRetry,
    TopicRoutes,
    error_text,
    overtaken_aggregates,
)
from cake_events.metrics import RelayMetrics
from cake_events.service.ports import (
    EventPublisher,
    EventsUnitOfWork,
    Leadership,
    MessageBatches,
    OutgoingBatch,
    RelayLeader,
    UnitOfWorkFactory,
)

_RESTART_BACKOFF = RetryPolicy(base_seconds=0.4, max_seconds=5.0)
"""How long the relay waits before it tries again after losing its database or failing
(0.4 s doubling up to 5 s, jittered): Cake's one retry policy."""
_YIELD_EVERY = 50
"""Events handed to the producer between two yields to the event loop. Appending to a
batch does not suspend, so without yields a claim would be handed over in one go: the
producer could not ship anything, the recording of the previous batch could not send its
statements, and admin RPCs served by this process would wait, until the whole batch was
handed over."""

_NO_ANSWER = asyncio.InvalidStateError("no answer from kafka in time")


def _answer(batch: OutgoingBatch) -> Any:
    """The batch's record metadata, or the exception that stands for its outcome
    (``_NO_ANSWER`` when Kafka has not answered)."""
    try:
        return batch.result()
    except asyncio.InvalidStateError:
        return _NO_ANSWER
    except BaseException as error:  # the batch's exception: Kafka's answer, or cancelled
        return error


_EVENT_ID = operator.attrgetter("event_id")
_EVENT_TYPE = operator.attrgetter("event_type")
_AGGREGATE_ID = operator.attrgetter("aggregate_id")

_log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RelayTiming:
    batch_size: int
    poll_interval_seconds: float
    leader_retry_seconds: float
    metrics_refresh_seconds: float
    retention_seconds: float
    retention_sweep_seconds: float
    idle_poll_max_seconds: float = 0.0
    """Longest fallback poll once idle: each quiet poll doubles the wait from
    ``poll_interval_seconds`` up to this (0 or less than the interval: no back-off)."""


def next_idle_wait(
    current: float, timing: RelayTiming, *, notified: bool, rows_in_retry: int | None
) -> float:
    """The fallback poll's next wait, after a wait that ended with or without a notification.

    Every outbox insert notifies (cake_common.outbox), so the poll only catches what a
    notification cannot announce: rows whose retry falls due. While such rows may exist
    (or that is not known yet) the relay polls at the base interval; otherwise each quiet
    poll doubles the wait (an idle relay costs its database a claim every few seconds instead
    of two a second), and a notification brings it back to the base at once.
    """
    base = timing.poll_interval_seconds
    if notified or rows_in_retry is None or rows_in_retry > 0:
        return base
    return max(base, min(current * 2, timing.idle_poll_max_seconds))


@dataclass(slots=True)
class _Acknowledged:
    """What Kafka acknowledged of a batch, column by column (entry *i* of each list is
    about the same event, in publication order): filled per event on the hot path, where
    an object per event cost more than appending to four lists."""

    events: list[OutboxEvent] = field(default_factory=list)
    topics: list[str] = field(default_factory=list)
    partitions: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.events)


@dataclass(frozen=True, slots=True)
class _Failed:
    event: OutboxEvent
    topic: str | None
    error: str


@dataclass(slots=True)
class _BatchResult:
    acknowledged: _Acknowledged = field(default_factory=_Acknowledged)
    failed: list[_Failed] = field(default_factory=list)
    kafka_unavailable: bool = False
    kept: list[OutboxEvent] = field(default_factory=list)
    """Security audit entries: stored in the events database, not sent to Kafka."""


@dataclass(frozen=True, slots=True)
class _PublishedBatch:
    """A batch Kafka is done with; the next transaction records its outcome."""

    events: list[OutboxEvent]
    result: _BatchResult
    retries: list[ScheduledRetry]
    parked: list[ParkedRow]
    letters: list[DeadLetter]

    @property
    def ids(self) -> list[int]:
        return [event.id for event in self.events]

    @property
    def failed_aggregates(self) -> frozenset[str]:
        """Aggregates whose rows after the failed one must wait (held back in the next
        batch until this outcome is recorded, then skipped by the claim's retry guard)."""
        return frozenset(failure.event.aggregate_id for failure in self.result.failed)


class OutboxRelay:
    """Relays one source's outbox while this replica is its active relay (see module doc)."""

    def __init__(
        self,
        source: str,
        *,
        leadership: Leadership,
        publisher: EventPublisher,
        events_uow: UnitOfWorkFactory,
        routes: TopicRoutes,
        failure_policy: FailurePolicy,
        timing: RelayTiming,
        metrics: RelayMetrics,
        envelopes: EnvelopeBuilder | None = None,
        uniform: Uniform = _random.uniform,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self._leadership = leadership
        self._publisher = publisher
        self._events_uow = events_uow
        self._routes = routes
        self._failure_policy = failure_policy
        self._timing = timing
        self._metrics = metrics
        self._envelopes = envelopes or EnvelopeBuilder()
        self._uniform = uniform
        self._clock = clock
        self.in_flight = 0
        """Rows of the batch being published right now (Cake's ``active``)."""
        self.is_active = False
        """True while this replica holds the source's relay lock."""
        self._rows_in_retry: int | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Stand by or relay until ``stop`` is set; then finish the batch in flight, give up
        the lock and close the producer. Errors (database or Kafka gone) never end it."""
        failures = 0
        self._metrics.active.labels(self.source).set(0)
        try:
            while not stop.is_set():
                try:
                    leader = await self._leadership(
                        retry_seconds=self._timing.leader_retry_seconds,
                        stop=stop,
                    )
                    if leader is None:
                        return
                    try:
                        self._set_active(True)
                        await self._lead(leader, stop)
                    finally:
                        self._set_active(False)
                        await leader.close()
                    failures = 0
                except Exception as error:
                    failures += 1
                    delay = _RESTART_BACKOFF.delay(failures, self._uniform)
                    if is_connection_error(error):
                        _log.warning(
                            "outbox relay lost its database, retrying",
                            source=self.source,
                            retry_in_seconds=delay,
                            error=repr(error),
                        )
                    else:
                        _log.exception(
                            "outbox relay failed, retrying",
                            source=self.source,
                            retry_in_seconds=delay,
                        )
                    await _sleep(stop, delay)
        finally:
            await self._publisher.close()

    def _set_active(self, active: bool) -> None:
        if active != self.is_active:
            _log.info(
                "outbox relay active" if active else "outbox relay standing down",
                source=self.source,
            )
        self.is_active = active
        self._metrics.active.labels(self.source).set(1 if active else 0)

    async def _lead(self, leader: RelayLeader, stop: asyncio.Event) -> None:
        await leader.listen()
        timing = self._timing
        # Unknown until the first backlog query: claim conservatively meanwhile.
        self._rows_in_retry = None
        previous: _PublishedBatch | None = None
        next_refresh = next_sweep = self._clock()
        idle_wait = timing.poll_interval_seconds
        while True:
            stopping = stop.is_set()
            if stopping and previous is None:
                return
            now = self._clock()
            if now >= next_refresh:
                next_refresh = now + timing.metrics_refresh_seconds
                backlog = await leader.backlog()
                # The database is exact when no batch is pending; a pending batch's retries
                # are counted in memory but not written yet, so then keep the larger count.
                self._rows_in_retry = (
                    backlog.in_retry
                    if previous is None
                    else max(backlog.in_retry, self._rows_in_retry or 0)
                )
                self._metrics.backlog.labels(self.source).set(backlog.waiting)
                self._metrics.lag_seconds.labels(self.source).set(backlog.oldest_age_seconds)
            if now >= next_sweep:
                next_sweep = now + timing.retention_sweep_seconds
                deleted = await leader.delete_published_older_than(timing.retention_seconds)
                if deleted:
                    _log.info("published outbox rows deleted", source=self.source, rows=deleted)
            # After an outage the pipeline drains: record what is pending, claim nothing.
            may_claim = not stopping and not (previous and previous.result.kafka_unavailable)
            if may_claim and not await self._publisher.start():
                # Kafka is down: rows wait in the outbox, no attempt is counted.
                may_claim = False
                if previous is None:
                    await _sleep(stop, timing.poll_interval_seconds)
                    continue
            previous = await self._step(leader, previous, may_claim=may_claim)
            if previous is not None:
                idle_wait = timing.poll_interval_seconds
            elif not stopping:
                # Nothing claimed, nothing pending: wait for new rows.
                notified = await _wait_for_rows(leader, stop, idle_wait)
                idle_wait = next_idle_wait(
                    idle_wait, timing, notified=notified, rows_in_retry=self._rows_in_retry
                )

    async def _step(
        self, leader: RelayLeader, previous: _PublishedBatch | None, *, may_claim: bool
    ) -> _PublishedBatch | None:
        """One transaction: claim the next batch and publish it while recording the
        previous one. Returns the batch just published (None if nothing was claimed)."""
        current: _PublishedBatch | None = None
        async with leader.transaction():
            events: list[OutboxEvent] = []
            if may_claim:
                events = await leader.claim(
                    self._timing.batch_size,
                    exclude_ids=previous.ids if previous else (),
                    guard_retries=self._rows_in_retry is None or self._rows_in_retry > 0,
                )
            self.in_flight = len(events)
            try:
                async with asyncio.TaskGroup() as tasks:
                    # Recording first: it sends its statements and waits, so the databases
                    # write while this process builds and hands over the next batch (the
                    # other way round, the databases only start once the batch is handed
                    # over, and then compete with Kafka while this process idles).
                    if previous is not None:
                        tasks.create_task(self._record(leader, previous))
                    publishing = (
                        tasks.create_task(self._publish_batch(events, previous)) if events else None
                    )
                current = publishing.result() if publishing is not None else None
            finally:
                self.in_flight = 0
        if previous is not None:
            await self._recorded(previous)
        return current

    async def _publish_batch(
        self, events: list[OutboxEvent], previous: _PublishedBatch | None
    ) -> _PublishedBatch:
        held_back = previous.failed_aggregates if previous is not None else frozenset()
        result = await self._publish(events, held_back)
        retries, parked, letters = self._settle_failures(result.failed)
        if letters:
            await self._copy_to_dead_letter_topics(letters, result)
        self._track_rows_in_retry(result, retries)
        return _PublishedBatch(events, result, retries, parked, letters)

    async def _record(self, leader: RelayLeader, batch: _PublishedBatch) -> None:
        """Write a published batch's outcome: audit log and dead letters (events database,
        committed here, first) and the outbox rows (committed with the caller's
        transaction), both at once."""
        result = batch.result
        async with self._events_uow() as uow:
            async with asyncio.TaskGroup() as both:
                both.create_task(self._write_events_database(uow, batch))
                both.create_task(
                    leader.record_outcome(
                        published_ids=[
                            event.id for event in (*result.acknowledged.events, *result.kept)
                        ],
                        retries=batch.retries,
                        parked=batch.parked,
                    )
                )
            await uow.commit()

    async def _write_events_database(self, uow: EventsUnitOfWork, batch: _PublishedBatch) -> None:
        acknowledged = batch.result.acknowledged
        events = acknowledged.events
        audit = PublishedBatch(
            self.source,
            event_ids=list(map(_EVENT_ID, events)),
            event_types=list(map(_EVENT_TYPE, events)),
            aggregate_ids=list(map(_AGGREGATE_ID, events)),
            topics=acknowledged.topics,
            partitions=acknowledged.partitions,
            offsets=acknowledged.offsets,
        )
        await uow.published.record(audit)
        await uow.dead_letters.park(batch.letters)
        # The security audit log keeps what it relays, in this same transaction.
        if batch.result.kept:
            await uow.audit.append(
                security_audit_entries(self.source, batch.result.kept), datetime.now(UTC)
            )

    async def _recorded(self, batch: _PublishedBatch) -> None:
        """After the outcome of ``batch`` committed: count it, react to an outage."""
        self._count(batch.result, batch.letters)
        if batch.result.kafka_unavailable:
            self._metrics.kafka_unavailable.labels(self.source).inc()
            _log.warning(
                "kafka unavailable, unpublished rows wait",
                source=self.source,
                acknowledged=len(batch.result.acknowledged),
                claimed=len(batch.events),
            )
            # Dropped only now that the pipeline is drained: nothing is left in the producer.
            await self._publisher.reset()

    def _track_rows_in_retry(self, result: _BatchResult, retries: Sequence[ScheduledRetry]) -> None:
        """Keep the count of rows waiting for a retry current between backlog queries: a
        claimed row is in retry exactly when it has failed before (``attempts > 0``)."""
        if self._rows_in_retry is None:
            return
        was_in_retry = {
            failure.event.id for failure in result.failed if failure.event.attempts > 0
        } | {event.id for event in result.acknowledged.events if event.attempts > 0}
        now_in_retry = {retry.row_id for retry in retries}
        self._rows_in_retry = max(
            0,
            self._rows_in_retry
            + len(now_in_retry - was_in_retry)
            - len(was_in_retry - now_in_retry),
        )

    async def _publish(
        self, events: Sequence[OutboxEvent], held_back: frozenset[str]
    ) -> _BatchResult:
        """Hand the claim to Kafka in id order, as per-partition batches, and wait for
        Kafka's acknowledgements; rows of the ``held_back`` aggregates are left untouched."""
        result = _BatchResult()
        order = AggregateOrder(held_back=set(held_back))
        sent: list[tuple[OutboxEvent, str, OutgoingBatch, int]] = []
        try:
            batches = self._publisher.batches()
        except self._publisher.send_errors:
            result.kafka_unavailable = True  # the producer is gone: every row waits
            return result
        # With tracing off there is no span to start: the message already carries the
        # row's own traceparent, which is what the span would have passed on.
        traced = tracing_enabled()
        for event in events:
            if result.kafka_unavailable or not order.may_publish(event):
                continue
            if event.event_type == SECURITY_AUDIT:
                result.kept.append(event)
                continue
            topic: str | None = None
            try:
                topic = self._routes.topic_for(event.event_type)
                message = self._envelopes.message_for(event, topic)
                if traced:
                    batch, index = await self._add_traced(batches, event, message)
                else:
                    batch, index = batches.add(message) or await batches.add_waiting(message)
            except PoisonEvent as error:
                result.failed.append(_Failed(event, topic, str(error)))
                order.stop_after(event)
                continue
            except self._publisher.send_errors as error:
                if self._publisher.unavailable(error):
                    result.kafka_unavailable = True
                else:  # rejected before sending, e.g. too large
                    result.failed.append(_Failed(event, topic, error_text(error)))
                    order.stop_after(event)
                continue
            sent.append((event, topic, batch, index))
            if len(sent) % _YIELD_EVERY == 0:
                await asyncio.sleep(0)

        await batches.send_all()
        if not await self._publisher.flush():
            result.kafka_unavailable = True
        self._report_overtaken(self._collect_outcomes(sent, result), result)
        return result

    def _report_overtaken(self, failed_in_kafka: list[OutboxEvent], result: _BatchResult) -> None:
        """Count the aggregates Kafka let overtake. A batch is taken or failed whole, so
        that only happens across two batches of one partition: Kafka failed one and
        accepted the next."""
        overtaken = overtaken_aggregates(failed_in_kafka, result.acknowledged.events)
        if overtaken:
            self._metrics.order_broken.labels(self.source).inc(len(overtaken))
            _log.error(
                "kafka failed an event after accepting a later one of its aggregate",
                source=self.source,
                aggregates=sorted(overtaken)[:20],
            )

    async def _add_traced(
        self, batches: MessageBatches, event: OutboxEvent, message: KafkaMessage
    ) -> tuple[OutgoingBatch, int]:
        """Hand over inside one PRODUCER span per event, continuing the trace of the request
        that wrote the row; the span's context travels on in the message's traceparent
        header. (Slower than the untraced path: a span and a header list per event.)"""
        with start_span_from_traceparent(
            f"{message.topic} publish",
            event.trace_parent,
            SpanKind.PRODUCER,
            attributes={
                "messaging.destination.name": message.topic,
                "cake.event_id": event.event_id,
            },
        ):
            traced = dataclasses.replace(message, headers=with_current_trace(message.headers))
            return batches.add(traced) or await batches.add_waiting(traced)

    def _collect_outcomes(
        self, sent: Sequence[tuple[OutboxEvent, str, OutgoingBatch, int]], result: _BatchResult
    ) -> list[OutboxEvent]:
        """Sort Kafka's answers into ``result``; the events Kafka did not acknowledge. An
        event's outcome is its batch's; its offset is the batch's base offset plus its
        index in the batch."""
        failed_in_kafka: list[OutboxEvent] = []
        acknowledged = result.acknowledged
        answers: dict[OutgoingBatch, Any] = {}
        for event, topic, batch, index in sent:
            answer = answers.get(batch)
            if answer is None:
                answer = answers[batch] = _answer(batch)
            if not isinstance(answer, BaseException):
                acknowledged.events.append(event)
                acknowledged.topics.append(topic)
                acknowledged.partitions.append(answer.partition)
                acknowledged.offsets.append(answer.offset + index)
                continue
            failed_in_kafka.append(event)
            if answer is _NO_ANSWER:
                # No answer in time (the broker went away with the batch in flight): never
                # guess an outcome; the row stays unpublished and is sent again later.
                continue
            if isinstance(answer, asyncio.CancelledError) or self._publisher.unavailable(answer):
                # Kafka is away for now (a cancelled batch: the producer was closed with it).
                result.kafka_unavailable = True
            else:
                result.failed.append(_Failed(event, topic, error_text(answer)))
        return failed_in_kafka

    def _settle_failures(
        self, failures: Sequence[_Failed]
    ) -> tuple[list[ScheduledRetry], list[ParkedRow], list[DeadLetter]]:
        retries: list[ScheduledRetry] = []
        parked: list[ParkedRow] = []
        letters: list[DeadLetter] = []
        for failure in failures:
            event = failure.event
            verdict = self._failure_policy.after_failure(event.attempts, self._uniform)
            if not verdict.dead_letter:
                retries.append(
                    ScheduledRetry(
                        event.id, verdict.attempts, failure.error, verdict.retry_in_seconds
                    )
                )
                _log.warning(
                    "event publication failed, will retry",
                    source=self.source,
                    event_id=event.event_id,
                    attempts=verdict.attempts,
                    retry_in_seconds=round(verdict.retry_in_seconds, 3),
                    error=failure.error,
                )
                continue
            parked.append(ParkedRow(event.id, verdict.attempts, failure.error))
            letters.append(
                DeadLetter(
                    event_id=UUID(event.event_id),
                    source=self.source,
                    event_type=event.event_type,
                    aggregate_type=event.aggregate_type,
                    aggregate_id=event.aggregate_id,
                    topic=failure.topic,
                    attempts=verdict.attempts,
                    last_error=failure.error,
                    payload=event.payload,
                    payload_type=event.payload_type,
                    occurred_at=event.occurred_at,
                )
            )
            _log.error(
                "event dead-lettered",
                source=self.source,
                event_id=event.event_id,
                event_type=event.event_type,
                attempts=verdict.attempts,
                error=failure.error,
            )
        return retries, parked, letters

    async def _copy_to_dead_letter_topics(
        self, letters: Sequence[DeadLetter], result: _BatchResult
    ) -> None:
        """Best effort: the dead letter is safe in the events database either way; a copy
        that cannot be made (no route, Kafka down, message too large) is counted."""
        events = {UUID(failure.event.event_id): failure.event for failure in result.failed}
        futures: list[asyncio.Future[Any]] = []
        not_copied = 0
        for letter in letters:
            if letter.topic is None or result.kafka_unavailable:
                not_copied += 1
                continue
            message = self._envelopes.dead_letter_message_for(
                events[letter.event_id],
                self._routes.dead_letter_topic(letter.topic),
                letter.last_error,
                source=self.source,
            )
            try:
                futures.append(await self._publisher.send(message))
            except self._publisher.send_errors as error:
                not_copied += 1
                _log.warning(
                    "dead letter not copied to kafka",
                    source=self.source,
                    event_id=str(letter.event_id),
                    error=repr(error),
                )
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        not_copied += sum(1 for outcome in outcomes if isinstance(outcome, BaseException))
        if not_copied:
            self._metrics.dead_letter_publish_failures.labels(self.source).inc(not_copied)

    def _count(self, result: _BatchResult, letters: Sequence[DeadLetter]) -> None:
        metrics = self._metrics
        per_topic: dict[str, int] = {}
        for topic in result.acknowledged.topics:
            per_topic[topic] = per_topic.get(topic, 0) + 1
        for topic, count in per_topic.items():
            metrics.published.labels(self.source, topic).inc(count)
        for failure in result.failed:
            metrics.failed_attempts.labels(self.source, failure.topic or "").inc()
        for letter in letters:
            metrics.dead_lettered.labels(self.source, letter.topic or "").inc()


class RelayGroup:
    """The relays of one process (one per source), run as background tasks."""

    def __init__(self, relays: Sequence[OutboxRelay]) -> None:
        self.relays = tuple(relays)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(relay.run(self._stop), name=f"outbox-relay-{relay.source}")
            for relay in self.relays
        ]

    async def stop(self) -> None:
        """Graceful: each relay finishes its batch in flight, then lets go of its source."""
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def in_flight(self, source: str) -> int:
        return sum(relay.in_flight for relay in self.relays if relay.source == source)


async def _wait_for_rows(leader: RelayLeader, stop: asyncio.Event, seconds: float) -> bool:
    """Wait for an outbox notification (True) for at most ``seconds``, or until ``stop`` is
    set (False): a long idle wait must not hold up a shutdown."""
    waiting = asyncio.ensure_future(leader.wait_for_notification(seconds))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((waiting, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not waiting.done():
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
    return waiting.result() if not waiting.cancelled() else False


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``stop`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
