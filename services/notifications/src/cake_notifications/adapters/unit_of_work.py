"""The unit of work over the notifications database: its repositories and the inbox in one
transaction."""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

from cake_common.db import UnitOfWork
from cake_common.inbox import record_many
from sqlalchemy.ext.asyncio import AsyncSession

from cake_notifications.adapters.repositories import (
    SqlDeliveryRepository,
    SqlNotificationRepository,
    SqlPreferenceRepository,
)

CONSUMER = "notifications"
"""This service's name in the inbox."""


class SqlInbox:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def record(self, event_ids: Sequence[UUID]) -> set[UUID]:
        return await record_many(self._session, event_ids, CONSUMER)


class SqlNotificationsUnitOfWork(UnitOfWork):
    notifications: SqlNotificationRepository
    deliveries: SqlDeliveryRepository
    preferences: SqlPreferenceRepository
    inbox: SqlInbox

    def bind_repositories(self, session: AsyncSession) -> None:
        self.notifications = SqlNotificationRepository(session)
        self.deliveries = SqlDeliveryRepository(session)
        self.preferences = SqlPreferenceRepository(session)
        self.inbox = SqlInbox(session)
