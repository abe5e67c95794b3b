"""Rules of the outbox relay (pure: no I/O, no clock, no randomness of its own).

Which topic an event goes to, what a failed publication costs (backoff, dead letter), and
how one aggregate's events keep their order when some of them fail. The event types, their
payloads, default topics and the dead-letter rule come from the event registry
(``cake.events.v1.registry``, generated from the contracts).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

from cake.events.v1 import registry
from cake_common.retry import RetryPolicy, Uniform

DEFAULT_TOPIC_ROUTES: Mapping[str, str] = MappingProxyType(
    {event.name: event.topic for event in registry.PUBLISHED}
)
"""The registry's topic of every event type the relay publishes (``TOPIC_ROUTES`` overrides)."""

MAX_ERROR_LENGTH = 2000
"""Longest error text kept with a failed row (Kafka errors can quote whole requests)."""


class PoisonEvent(Exception):  # noqa: N818 (a kind of event, not an error in the relay)
    """An outbox row that cannot be published as it is (no route, unreadable payload):
    retrying it cannot help until someone fixes the row or the configuration."""


@dataclass(slots=True)
class OutboxEvent:
    """One claimed outbox row (layout: ``cake_common.outbox``).

    Not frozen: one is built per event on the relay's hot path, and a frozen dataclass
    takes about twice as long to construct. Treat it as read-only.
    """

    id: int
    event_id: str
    """In its canonical text form, the way it travels (envelope, ``ce_id`` header): read
    as text, it costs no UUID object per row on the relay's hot path."""
    event_type: str
    aggregate_type: str
    aggregate_id: str
    payload: bytes
    payload_type: str
    occurred_at: datetime
    trace_parent: str | None
    attempts: int


@dataclass(frozen=True, slots=True)
class TopicRoutes:
    """Kafka topic per event type, and where the dead letters of a topic go."""

    routes: Mapping[str, str]

    def topic_for(self, event_type: str) -> str:
        """The topic of ``event_type``; ``PoisonEvent`` for an event type with no route."""
        topic = self.routes.get(event_type)
        if topic is None:
            raise PoisonEvent(f"no topic route for event type {event_type!r}")
        return topic

    @staticmethod
    def dead_letter_topic(topic: str) -> str:
        """The registry's rule, the same for every writer of dead letters."""
        return registry.dead_letter_topic_for(topic)


@dataclass(frozen=True, slots=True)
class FailureVerdict:
    """What becomes of a row after one more failed publication."""

    attempts: int
    dead_letter: bool
    retry_in_seconds: float


@dataclass(frozen=True, slots=True)
class FailurePolicy:
    """What one more failed publication costs a row: a retry after Cake's one backoff
    (:class:`cake_common.retry.RetryPolicy`: the n-th retry waits between half and all of
    ``min(base * 2**(n-1), max)``, so rows that failed together spread out), then a dead
    letter once the row has failed ``max_attempts`` times."""

    max_attempts: int
    backoff: RetryPolicy

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def after_failure(self, attempts_before: int, uniform: Uniform) -> FailureVerdict:
        """The verdict for a row that had failed ``attempts_before`` times and failed again;
        ``uniform(low, high)`` draws the jitter (``random.uniform``; tests pass their own)."""
        attempts = attempts_before + 1
        if attempts >= self.max_attempts:
            return FailureVerdict(attempts=attempts, dead_letter=True, retry_in_seconds=0.0)
        return FailureVerdict(
            attempts=attempts,
            dead_letter=False,
            retry_in_seconds=self.backoff.delay(attempts, uniform),
        )


@dataclass(frozen=True, slots=True)
class ScheduledRetry:
    """A failed row to try again after ``delay_seconds``."""

    row_id: int
    attempts: int
    error: str
    delay_seconds: float


@dataclass(frozen=True, slots=True)
class ParkedRow:
    """A row given up on (dead-lettered)."""

    row_id: int
    attempts: int
    error: str


@dataclass(frozen=True, slots=True)
class Backlog:
    """The outbox rows still to relay."""

    waiting: int
    """Rows neither published nor dead-lettered."""
    oldest_age_seconds: float
    in_retry: int
    """Of those, rows that failed and wait for (or are due for) another attempt."""


@dataclass(slots=True)
class AggregateOrder:
    """Keeps one aggregate's events in order inside one batch.

    Rows are offered in ``id`` (commit) order. Once a row of an aggregate could not be
    published, every later row of that aggregate in the batch is held back untouched (no
    attempt counted): publishing it would let it overtake the failed one. ``held_back``
    starts with the aggregates that failed in the previous batch, whose retries are not
    recorded yet; once they are, the claim query skips such rows instead.
    """

    held_back: set[str] = field(default_factory=set)

    def may_publish(self, event: OutboxEvent) -> bool:
        return event.aggregate_id not in self.held_back

    def stop_after(self, event: OutboxEvent) -> None:
        """``event`` failed: hold back the rest of its aggregate."""
        self.held_back.add(event.aggregate_id)


def overtaken_aggregates(
    failed: Iterable[OutboxEvent], published: Iterable[OutboxEvent]
) -> set[str]:
    """Aggregates with a row that failed *after* being handed to Kafka while a later row of
    the same aggregate was acknowledged: their order on Kafka is broken (the failed row
    will come later). Only possible when Kafka fails one produce request and accepts the
    next; reported so operators see it."""
    first_failure: dict[str, int] = {}
    for event in failed:
        first_failure[event.aggregate_id] = min(
            event.id, first_failure.get(event.aggregate_id, event.id)
        )
    if not first_failure:  # the usual case: nothing failed, nothing to scan
        return set()
    return {
        event.aggregate_id
        for event in published
        if event.id > first_failure.get(event.aggregate_id, event.id)
    }


def error_text(error: BaseException) -> str:
    """A bounded one-line description of ``error`` for ``last_error`` columns."""
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text[:MAX_ERROR_LENGTH]
