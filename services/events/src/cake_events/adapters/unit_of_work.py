"""The events database's unit of work: one transaction with its repositories on it."""

from __future__ import annotations

from cake_common.db import UnitOfWork
from sqlalchemy.ext.asyncio import AsyncSession

from cake_events.adapters.event_store import (
    AuditLogRepository,
    DeadLetterRepository,
    PublishedEventRepository,
)


class SqlEventsUnitOfWork(UnitOfWork):
    """One transaction on the events database with its repositories."""

    published: PublishedEventRepository
    dead_letters: DeadLetterRepository
    audit: AuditLogRepository

    def bind_repositories(self, session: AsyncSession) -> None:
        self.published = PublishedEventRepository(session)
        self.dead_letters = DeadLetterRepository(session)
        self.audit = AuditLogRepository(session)
