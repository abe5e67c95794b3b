"""What the use cases need from the outside world, as ports: the outbox session the relay
leads, the Kafka producer, the events database, each source's outbox for the admin and the
components the health report probes. The adapters implement them
(:mod:`cake_events.adapters.outbox_source`, :mod:`~cake_events.adapters.kafka_publisher`,
:mod:`~cake_events.adapters.event_store`, :mod:`~cake_events.adapters.health_probes`); the
unit tests pass in-memory fakes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from cake_common.db import TransactionPort

from cake_events.domain.audit import AuditCursor, AuditFilter, StoredAuditEntry
from cake_events.domain.delivery import DeadLetter, DeadLetterCursor, PublishedBatch, ReplayStatus
from cake_events.domain.envelope import KafkaMessage
from cake_events.domain.relay import Backlog, OutboxEvent, ParkedRow, ScheduledRetry


class RelayLeader(Protocol):
    """The database session of the active relay of one outbox (it holds the relay lock)."""

    async def listen(self) -> None: ...

    async def wait_for_notification(self, timeout_seconds: float) -> bool:
        """True when new rows were announced, False when ``timeout_seconds`` passed."""
        ...

    def transaction(self) -> AbstractAsyncContextManager[None]:
        """Commit if the block succeeds, roll back if it raises."""
        ...

    async def claim(
        self, batch_size: int, *, exclude_ids: Sequence[int], guard_retries: bool
    ) -> list[OutboxEvent]: ...

    async def record_outcome(
        self,
        *,
        published_ids: Sequence[int],
        retries: Sequence[ScheduledRetry],
        parked: Sequence[ParkedRow],
    ) -> None: ...

    async def backlog(self) -> Backlog: ...

    async def delete_published_older_than(self, retention_seconds: float) -> int: ...

    async def close(self) -> None: ...


class Leadership(Protocol):
    """Become the active relay of a source: the leader session once this replica holds the
    lock, or None if ``stop`` was set while standing by."""

    def __call__(
        self, *, retry_seconds: float, stop: asyncio.Event
    ) -> Awaitable[RelayLeader | None]: ...


class OutgoingBatch(Protocol):
    """Messages of one topic partition that Kafka takes or fails together."""

    def result(self) -> Any:
        """Kafka's record metadata of the batch: ``partition`` and the base ``offset`` (the
        message at index *i* of the batch is at base offset + *i*). Raises Kafka's error
        (or the one that kept the batch from being handed over), ``asyncio.InvalidStateError``
        while Kafka has not answered, ``asyncio.CancelledError`` if the producer dropped it."""
        ...


class MessageBatches(Protocol):
    """One claim's messages, gathered into one batch per topic partition (the partition
    of the message's key); full batches are handed over at once, in order per partition."""

    def add(self, message: KafkaMessage) -> tuple[OutgoingBatch, int] | None:
        """Append ``message`` to its batch: that batch and the message's index in it. None
        if that needs the producer first (then :meth:`add_waiting`); raises one of the
        publisher's ``send_errors`` for a message refused on its own (too large)."""
        ...

    async def add_waiting(self, message: KafkaMessage) -> tuple[OutgoingBatch, int]:
        """:meth:`add`, waiting for the producer (topic metadata, room for a full batch);
        raises ``send_errors`` as :meth:`add` does, or when Kafka is away."""
        ...

    async def send_all(self) -> None:
        """Hand over the batches not handed over yet."""
        ...


class EventPublisher(Protocol):
    """A Kafka producer that can be dropped after an outage and started again."""

    async def start(self) -> bool:
        """True once a producer is started; False while Kafka is unreachable."""
        ...

    send_errors: tuple[type[BaseException], ...]
    """What :meth:`send` raises for a message it could not hand over."""

    def send(self, message: KafkaMessage) -> Awaitable[asyncio.Future[Any]]:
        """Hand ``message`` over; the future resolves to Kafka's record metadata
        (``partition``, ``offset``) or fails with Kafka's error."""
        ...

    def unavailable(self, error: BaseException) -> bool:
        """True if ``error`` (raised by :meth:`send` or set on its future) says Kafka could
        not take any message right now, False if it refused this one (too large, invalid):
        only the latter counts as a failed attempt of the row."""
        ...

    def batches(self) -> MessageBatches:
        """Empty batches for one claim (raises ``send_errors`` if no producer is started)."""
        ...

    async def flush(self) -> bool:
        """Every message handed over is answered (False: not in time)."""
        ...

    async def reset(self) -> None: ...

    async def close(self) -> None: ...


class PublishedEvents(Protocol):
    async def record(self, batch: PublishedBatch) -> None: ...

    async def count_by_source(self) -> dict[str, int]:
        """Publications in the audit log, per source."""
        ...


class DeadLetters(Protocol):
    async def park(self, letters: Sequence[DeadLetter]) -> None: ...

    async def count_parked_by_source(self) -> dict[str, int]: ...

    async def mark_retried(self, event_ids: Sequence[UUID]) -> None: ...

    async def page(self, limit: int, after: DeadLetterCursor | None) -> list[DeadLetter]:
        """Parked dead letters, newest first, after ``after``."""
        ...


class AuditLog(Protocol):
    async def append(self, entries: Sequence[StoredAuditEntry], recorded_at: datetime) -> None: ...

    async def page(
        self, where: AuditFilter, limit: int, after: AuditCursor | None
    ) -> list[StoredAuditEntry]:
        """Entries matching ``where``, newest first, after ``after``."""
        ...


class EventsUnitOfWork(TransactionPort, Protocol):
    """One transaction on the events database."""

    @property
    def published(self) -> PublishedEvents: ...

    @property
    def dead_letters(self) -> DeadLetters: ...

    @property
    def audit(self) -> AuditLog: ...


class UnitOfWorkFactory(Protocol):
    def __call__(self) -> EventsUnitOfWork: ...


class OutboxAdministration(Protocol):
    """Admin operations on one source's outbox."""

    async def waiting(self) -> int:
        """Rows not yet published nor dead-lettered (in flight ones included)."""
        ...

    async def requeue_dead_letters(self) -> list[UUID]:
        """Put every dead-lettered row back for publication; returns their event ids."""
        ...

    async def replay(self, event_id: UUID) -> ReplayStatus | None:
        """Put one published or dead-lettered event back; None if this outbox has no such
        row."""
        ...


ProbeResult = tuple[bool, str]
"""``(healthy, detail)``."""
ProbeFunction = Callable[[], Awaitable[ProbeResult]]
"""Looks at one component; never raises."""


@dataclass(frozen=True, slots=True)
class ComponentProbe:
    """One named component, whether the system needs it to serve, and how to look at it."""

    name: str
    critical: bool
    probe: ProbeFunction
