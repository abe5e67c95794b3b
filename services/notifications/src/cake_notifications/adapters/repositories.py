"""The repositories over the notifications database (the unit of work: unit_of_work.py)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from cake_notifications.adapters.tables import deliveries, notifications, preferences
from cake_notifications.domain.notifications import (
    Channel,
    Delivery,
    DeliveryStatus,
    Kind,
    Language,
    Notification,
    PageCursor,
    Preferences,
)


def _notification(row: Any) -> Notification:
    return Notification(
        id=row.id,
        user_id=row.user_id,
        event_id=row.event_id,
        kind=Kind(row.kind),
        title=row.title,
        body=row.body,
        created_at=row.created_at,
        channels=tuple(Channel(c) for c in row.channels),
        read_at=row.read_at,
    )


_ADD_MANY = sa.text(
    """
WITH added AS (
    INSERT INTO notifications
        (id, user_id, event_id, kind, title, body, facts, channels, trace_parent, created_at)
    SELECT n.id, n.user_id, n.event_id, n.kind, n.title, n.body, CAST(n.facts AS jsonb),
           string_to_array(n.channels, ','), n.trace_parent, n.created_at
    FROM unnest(
        CAST(:ids AS uuid[]), CAST(:user_ids AS bigint[]), CAST(:event_ids AS uuid[]),
        CAST(:kinds AS text[]), CAST(:titles AS text[]), CAST(:bodies AS text[]),
        CAST(:facts AS text[]), CAST(:channels AS text[]), CAST(:trace_parents AS text[]),
        CAST(:created_ats AS timestamptz[])
    ) AS n(id, user_id, event_id, kind, title, body, facts, channels, trace_parent, created_at)
    RETURNING id
)
INSERT INTO deliveries (id, notification_id, channel, status, attempts, due_at)
SELECT d.id, d.notification_id, d.channel, 'pending', CAST(:attempts AS integer),
       COALESCE(CAST(:claimed_until AS timestamptz), now())
FROM unnest(
    CAST(:delivery_ids AS uuid[]), CAST(:delivery_notifications AS uuid[]),
    CAST(:delivery_channels AS text[])
) AS d(id, notification_id, channel)
JOIN added ON added.id = d.notification_id
"""
)


class SqlNotificationRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(
        self, notification: Notification, facts: Mapping[str, str], trace_parent: str | None
    ) -> None:
        await self.add_many([(notification, facts, trace_parent)])

    async def add_many(
        self,
        entries: Sequence[tuple[Notification, Mapping[str, str], str | None]],
        *,
        claimed_until: datetime | None = None,
    ) -> list[Delivery]:
        if not entries:
            return []
        created = [
            Delivery(
                id=uuid4(),
                notification_id=notification.id,
                user_id=notification.user_id,
                channel=channel,
                kind=notification.kind,
                attempts=0 if claimed_until is None else 1,
                facts=facts,
                occurred_at=notification.created_at,
                trace_parent=trace_parent,
            )
            for notification, facts, trace_parent in entries
            for channel in notification.channels
        ]
        # ONE statement for a whole consumer batch, the rows as arrays: two executemany
        # INSERTs (one per table) were two round trips, each compiled again per batch and run
        # through psycopg's pipeline mode, together a sixth of the service's CPU time under
        # load (py-spy on bench/notifications.py).
        await self._session.execute(
            _ADD_MANY,
            {
                "ids": [n.id for n, _, _ in entries],
                "user_ids": [n.user_id for n, _, _ in entries],
                "event_ids": [n.event_id for n, _, _ in entries],
                "kinds": [n.kind.value for n, _, _ in entries],
                "titles": [n.title for n, _, _ in entries],
                "bodies": [n.body for n, _, _ in entries],
                "facts": [json.dumps(dict(facts)) for _, facts, _ in entries],
                "channels": [",".join(c.value for c in n.channels) for n, _, _ in entries],
                "trace_parents": [trace_parent for _, _, trace_parent in entries],
                "created_ats": [n.created_at for n, _, _ in entries],
                "delivery_ids": [d.id for d in created],
                "delivery_notifications": [d.notification_id for d in created],
                "delivery_channels": [d.channel.value for d in created],
                "attempts": 0 if claimed_until is None else 1,
                # Claimed by the caller: leased like a claim (due again when it ends).
                # Otherwise due at the transaction's time (the database clock).
                "claimed_until": claimed_until,
            },
        )
        return created

    async def page(
        self, user_id: int, *, after: PageCursor | None, limit: int, unread_only: bool
    ) -> list[Notification]:
        query = sa.select(notifications).where(notifications.c.user_id == user_id)
        if after is not None:
            query = query.where(
                sa.tuple_(notifications.c.created_at, notifications.c.id)
                < sa.tuple_(sa.literal(after.created_at), sa.literal(after.id))
            )
        if unread_only:
            query = query.where(notifications.c.read_at.is_(None))
        query = query.order_by(notifications.c.created_at.desc(), notifications.c.id.desc()).limit(
            limit
        )
        return [_notification(row) for row in await self._session.execute(query)]

    async def unread_count(self, user_id: int) -> int:
        result = await self._session.execute(
            sa.select(sa.func.count())
            .select_from(notifications)
            .where(notifications.c.user_id == user_id, notifications.c.read_at.is_(None))
        )
        return int(result.scalar_one())

    async def mark_read(
        self, user_id: int, notification_id: UUID, at: datetime
    ) -> Notification | None:
        result = await self._session.execute(
            notifications.update()
            .where(
                notifications.c.id == notification_id,
                notifications.c.user_id == user_id,
            )
            # Read twice: the first time stays.
            .values(read_at=sa.func.coalesce(notifications.c.read_at, at))
            .returning(*notifications.c)
        )
        row = result.first()
        return None if row is None else _notification(row)


_CLAIM = sa.text(
    """
WITH due AS (
    SELECT d.id FROM deliveries d
    WHERE d.status = 'pending' AND d.due_at <= :now
    ORDER BY d.due_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
UPDATE deliveries d
SET attempts = d.attempts + 1, due_at = :lease_until
FROM due, notifications n
WHERE d.id = due.id AND n.id = d.notification_id
RETURNING d.id, d.notification_id, d.channel, d.attempts, n.user_id, n.kind, n.facts,
          n.created_at, n.trace_parent
"""
)


_MARK_SENT = sa.text(
    """
UPDATE deliveries d
SET status = 'sent', sent_at = v.sent_at, last_error = NULL
FROM unnest(CAST(:ids AS uuid[]), CAST(:ats AS timestamptz[])) AS v(id, sent_at)
WHERE d.id = v.id
"""
)


class SqlDeliveryRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def claim_due(self, now: datetime, limit: int, lease_seconds: float) -> list[Delivery]:
        # The lease is the due time pushed forward: a dispatcher that dies mid-send leaves
        # the delivery pending, due again when the lease runs out.
        result = await self._session.execute(
            _CLAIM,
            {"now": now, "limit": limit, "lease_until": now + timedelta(seconds=lease_seconds)},
        )
        return [
            Delivery(
                id=row.id,
                notification_id=row.notification_id,
                user_id=row.user_id,
                channel=Channel(row.channel),
                kind=Kind(row.kind),
                attempts=row.attempts,
                facts={str(k): str(v) for k, v in row.facts.items()},
                occurred_at=row.created_at,
                trace_parent=row.trace_parent,
            )
            for row in result
        ]

    async def mark_sent(self, sent: Sequence[tuple[UUID, datetime]]) -> None:
        # One statement for the lot, each row with its own time (when its channel took it).
        await self._session.execute(
            _MARK_SENT,
            {"ids": [delivery_id for delivery_id, _ in sent], "ats": [at for _, at in sent]},
        )

    async def mark_failed(self, delivery_id: UUID, at: datetime, error: str) -> None:
        await self._session.execute(
            deliveries.update()
            .where(deliveries.c.id == delivery_id)
            .values(status=DeliveryStatus.FAILED.value, last_error=error)
        )

    async def mark_skipped(self, delivery_id: UUID, at: datetime, reason: str) -> None:
        await self._session.execute(
            deliveries.update()
            .where(deliveries.c.id == delivery_id)
            .values(status=DeliveryStatus.SKIPPED.value, last_error=reason)
        )

    async def retry_later(self, delivery_id: UUID, due: datetime, error: str) -> None:
        await self._session.execute(
            deliveries.update()
            .where(deliveries.c.id == delivery_id)
            .values(due_at=due, last_error=error)
        )

    async def next_due(self) -> datetime | None:
        result = await self._session.execute(
            sa.select(sa.func.min(deliveries.c.due_at)).where(
                deliveries.c.status == DeliveryStatus.PENDING.value
            )
        )
        value: datetime | None = result.scalar_one()
        return value


def _preferences(row: Any) -> Preferences:
    return Preferences(
        user_id=row.user_id,
        email=row.email,
        sms=row.sms,
        push=row.push,
        language=Language(row.language) if row.language else None,
    )


class SqlPreferenceRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def get(self, user_id: int) -> Preferences | None:
        result = await self._session.execute(
            sa.select(preferences).where(preferences.c.user_id == user_id)
        )
        row = result.first()
        return None if row is None else _preferences(row)

    async def get_many(self, user_ids: Sequence[int]) -> dict[int, Preferences]:
        if not user_ids:
            return {}
        result = await self._session.execute(
            sa.select(preferences).where(preferences.c.user_id.in_(list(user_ids)))
        )
        return {row.user_id: _preferences(row) for row in result}

    async def put(self, chosen: Preferences) -> None:
        values = {
            "email": chosen.email,
            "sms": chosen.sms,
            "push": chosen.push,
            "language": chosen.language.value if chosen.language else None,
        }
        statement = pg_insert(preferences).values(user_id=chosen.user_id, **values)
        await self._session.execute(
            statement.on_conflict_do_update(
                index_elements=[preferences.c.user_id],
                set_={**values, "updated_at": sa.func.now()},
            )
        )
