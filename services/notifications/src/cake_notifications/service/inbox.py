"""The user's side: their notification list, marking read, their preferences."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from uuid import UUID

from cake_notifications.domain.notifications import (
    Notification,
    NotificationNotFound,
    Page,
    PageCursor,
    Preferences,
    page_size,
)
from cake_notifications.service.ports import UnitOfWorkFactory


def utc_now() -> datetime:
    return datetime.now(UTC)


class UserNotifications:
    def __init__(
        self, uow_factory: UnitOfWorkFactory, clock: Callable[[], datetime] = utc_now
    ) -> None:
        self._uow_factory = uow_factory
        self._clock = clock

    async def list(
        self, user_id: int, *, requested_size: int, page_token: str, unread_only: bool
    ) -> Page:
        after = PageCursor.parse(page_token) if page_token else None
        limit = page_size(requested_size)
        async with self._uow_factory() as uow:
            rows = await uow.notifications.page(
                user_id, after=after, limit=limit + 1, unread_only=unread_only
            )
            unread = await uow.notifications.unread_count(user_id)
        more = len(rows) > limit
        rows = rows[:limit]
        token = PageCursor(rows[-1].created_at, rows[-1].id).token() if more else ""
        return Page(notifications=rows, next_page_token=token, unread_count=unread)

    async def mark_read(self, user_id: int, notification_id: UUID) -> Notification:
        async with self._uow_factory() as uow:
            notification = await uow.notifications.mark_read(
                user_id, notification_id, self._clock()
            )
            if notification is None:
                raise NotificationNotFound()
            await uow.commit()
        return notification

    async def preferences(self, user_id: int) -> Preferences:
        async with self._uow_factory() as uow:
            return await uow.preferences.get(user_id) or Preferences(user_id)

    async def update_preferences(
        self,
        user_id: int,
        *,
        email: bool | None,
        sms: bool | None,
        push: bool | None,
        language: str | None,
    ) -> Preferences:
        async with self._uow_factory() as uow:
            current = await uow.preferences.get(user_id) or Preferences(user_id)
            updated = current.changed(email=email, sms=sms, push=push, language=language)
            await uow.preferences.put(updated)
            await uow.commit()
        return updated
