"""Admin use cases around the relay: queue statistics, dead letters, retry and replay.

Every use case requires the caller's ``admin`` role first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID, uuid4

from cake_common.audit import DEAD_LETTERS_RETRIED, EVENT_REPLAYED
from cake_common.auth_context import require_admin
from cake_common.errors import FieldViolation, InvalidArgument, NotFound
from cake_common.logging import get_logger

from cake_events.domain.audit import AuditCursor, AuditFilter, AuditPage, StoredAuditEntry
from cake_events.domain.delivery import (
    DeadLetter,
    DeadLetterCursor,
    InvalidPageTokenError,
    QueueStats,
    ReplayStatus,
    SourceQueueStats,
)
from cake_events.service.ports import OutboxAdministration, UnitOfWorkFactory

DEFAULT_PAGE_SIZE = 50
DEFAULT_AUDIT_PAGE_SIZE = 100
EVENTS_SOURCE = "events"

_log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class DeadLetterPage:
    dead_letters: list[DeadLetter]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class SourceOutbox:
    """A configured outbox source: its name, the topics its events go to, its outbox."""

    name: str
    topics: tuple[str, ...]
    outbox: OutboxAdministration


class EventAdministration:
    """``outboxes``: the configured sources, in order; ``in_flight(source)`` tells how many
    of a source's rows this replica is publishing right now."""

    def __init__(
        self,
        *,
        events_uow: UnitOfWorkFactory,
        outboxes: Sequence[SourceOutbox],
        in_flight: Callable[[str], int],
    ) -> None:
        self._events_uow = events_uow
        self._sources = tuple(outboxes)
        self._outboxes = {source.name: source.outbox for source in self._sources}
        self._in_flight = in_flight

    async def queue_stats(self) -> list[SourceQueueStats]:
        """Statistics per configured source, in order; then any other source the events
        database still has publications or dead letters of (no longer configured), with no
        topics."""
        require_admin()
        waiting = await asyncio.gather(*(source.outbox.waiting() for source in self._sources))
        async with self._events_uow() as uow:
            completed = await uow.published.count_by_source()
            failed = await uow.dead_letters.count_parked_by_source()
        unpublished = {
            source.name: count for source, count in zip(self._sources, waiting, strict=True)
        }
        topics = {source.name: source.topics for source in self._sources}
        recorded = sorted((completed.keys() | failed.keys()) - topics.keys())
        stats: list[SourceQueueStats] = []
        for name in [*topics, *recorded]:
            active = self._in_flight(name)
            stats.append(
                SourceQueueStats(
                    source=name,
                    topics=topics.get(name, ()),
                    stats=QueueStats(
                        waiting=max(0, unpublished.get(name, 0) - active),
                        active=active,
                        completed=completed.get(name, 0),
                        failed=failed.get(name, 0),
                    ),
                )
            )
        return stats

    async def retry_failed(self) -> int:
        """Put every dead-lettered event of every source back for publication."""
        principal = require_admin()
        retried = 0
        for source, outbox in self._outboxes.items():
            event_ids = await outbox.requeue_dead_letters()
            if not event_ids:
                continue
            async with self._events_uow() as uow:
                await uow.dead_letters.mark_retried(event_ids)
                await uow.audit.append(
                    [
                        _admin_entry(
                            DEAD_LETTERS_RETRIED,
                            principal.user_id,
                            {"source": source, "count": str(len(event_ids))},
                        )
                    ],
                    datetime.now(UTC),
                )
                await uow.commit()
            retried += len(event_ids)
            _log.info(
                "dead letters put back for publication",
                source=source,
                count=len(event_ids),
                admin_id=principal.user_id,
            )
        return retried

    async def list_dead_letters(self, page_size: int, page_token: str) -> DeadLetterPage:
        """Parked dead letters, newest first; ``page_size`` 0 means the default."""
        require_admin()
        try:
            after = DeadLetterCursor.from_token(page_token) if page_token else None
        except InvalidPageTokenError as error:
            raise InvalidArgument(
                "Invalid page token", [FieldViolation("page_token", str(error))]
            ) from None
        limit = page_size or DEFAULT_PAGE_SIZE
        async with self._events_uow() as uow:
            rows = await uow.dead_letters.page(limit + 1, after)
        page, more = rows[:limit], len(rows) > limit
        next_token = ""
        if more:
            last = page[-1]
            assert last.failed_at is not None  # read back from the database
            next_token = DeadLetterCursor(last.failed_at, last.event_id).token()
        return DeadLetterPage(dead_letters=page, next_page_token=next_token)

    async def replay_event(self, event_id: UUID) -> ReplayStatus:
        """Publish one event again, whether it was published or dead-lettered.

        The event goes back through its outbox (published_at/dead_lettered_at cleared), so
        the relay republishes it with the usual guarantees and audit. Published rows are
        only kept for the retention period: older events are NOT_FOUND.
        """
        principal = require_admin()
        for source, outbox in self._outboxes.items():
            status = await outbox.replay(event_id)
            if status is None:
                continue
            async with self._events_uow() as uow:
                await uow.dead_letters.mark_retried([event_id])
                await uow.audit.append(
                    [
                        _admin_entry(
                            EVENT_REPLAYED,
                            principal.user_id,
                            {"source": source, "event_id": str(event_id)},
                        )
                    ],
                    datetime.now(UTC),
                )
                await uow.commit()
            _log.info(
                "event replay requested",
                source=source,
                event_id=str(event_id),
                admin_id=principal.user_id,
            )
            return status
        raise NotFound("Event not found", reason="EVENT_NOT_FOUND")

    async def list_audit_events(
        self, where: AuditFilter, page_size: int, page_token: str
    ) -> AuditPage:
        """The security audit log, newest first; ``page_size`` 0 means the default."""
        require_admin()
        try:
            after = AuditCursor.from_token(page_token) if page_token else None
        except InvalidPageTokenError as error:
            raise InvalidArgument(
                "Invalid page token", [FieldViolation("page_token", str(error))]
            ) from None
        if where.since is not None and where.until is not None and where.since >= where.until:
            raise InvalidArgument(
                "Invalid time range", [FieldViolation("until", "must be after since")]
            )
        limit = page_size or DEFAULT_AUDIT_PAGE_SIZE
        async with self._events_uow() as uow:
            rows = await uow.audit.page(where, limit + 1, after)
        page, more = rows[:limit], len(rows) > limit
        next_token = AuditCursor(page[-1].occurred_at, page[-1].event_id).token() if more else ""
        return AuditPage(entries=page, next_page_token=next_token)


def _admin_entry(kind: str, admin_id: int, details: dict[str, str]) -> StoredAuditEntry:
    return StoredAuditEntry(
        event_id=uuid4(),
        source=EVENTS_SOURCE,
        type=kind,
        actor_user_id=admin_id,
        subject_user_id=0,
        client_ip="",
        details=details,
        occurred_at=datetime.now(UTC),
    )
