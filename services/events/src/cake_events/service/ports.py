"""What the relay needs from the outside world, as ports: the outbox session it leads, the
Kafka producer and the events database. The adapters implement them
(:mod:`cake_events.adapters.outbox_source`, :mod:`~cake_events.adapters.kafka_publisher`,
:mod:`~cake_events.adapters.event_store`); the unit tests pass in-memory fakes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Protocol

from cake_common.db import TransactionPort

from cake_events.domain.audit import StoredAuditEntry
from cake_events.domain.delivery import DeadLetter, PublishedBatch
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


class EventPublisher(Protocol):
    """A Kafka producer that can be dropped after an outage and started again."""

    async def start(self) -> bool:
        """True once a producer is started; False while Kafka is unreachable."""
        ...

    def send(self, message: KafkaMessage) -> Awaitable[asyncio.Future[Any]]:
        """Hand ``message`` over; the future resolves to Kafka's record metadata
        (``partition``, ``offset``) or fails with Kafka's error."""
        ...

    async def flush(self) -> bool:
        """Every message handed over is answered (False: not in time)."""
        ...

    async def reset(self) -> None: ...

    async def close(self) -> None: ...


class PublishedEvents(Protocol):
    async def record(self, batch: PublishedBatch) -> None: ...


class DeadLetters(Protocol):
    async def park(self, letters: Sequence[DeadLetter]) -> None: ...


class AuditLog(Protocol):
    async def append(self, entries: Sequence[StoredAuditEntry], recorded_at: datetime) -> None: ...


class RelayUnitOfWork(TransactionPort, Protocol):
    """One transaction on the events database, with what the relay writes there."""

    @property
    def published(self) -> PublishedEvents: ...

    @property
    def dead_letters(self) -> DeadLetters: ...

    @property
    def audit(self) -> AuditLog: ...
