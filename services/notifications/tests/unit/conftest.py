"""In-memory fakes of the notifications ports (unit tests only), handed out as fixtures."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Self
from uuid import UUID, uuid4

import pytest
from cake_notifications.domain.notifications import (
    Channel,
    Delivery,
    Kind,
    Notification,
    PageCursor,
    Preferences,
)
from cake_notifications.service.ports import Contacts, OutgoingMessage, TransientSendError


@dataclass
class StoredDelivery:
    id: UUID
    notification: Notification
    channel: Channel
    facts: Mapping[str, str]
    trace_parent: str | None
    status: str = "pending"
    attempts: int = 0
    due_at: datetime | None = None
    last_error: str | None = None


@dataclass
class Store:
    notifications: dict[UUID, Notification] = field(default_factory=dict)
    deliveries: dict[UUID, StoredDelivery] = field(default_factory=dict)
    preferences: dict[int, Preferences] = field(default_factory=dict)
    inbox: set[UUID] = field(default_factory=set)
    now: datetime | None = None


def _delivery(stored: StoredDelivery) -> Delivery:
    return Delivery(
        stored.id,
        stored.notification.id,
        stored.notification.user_id,
        stored.channel,
        stored.notification.kind,
        stored.attempts,
        stored.facts,
        stored.notification.created_at,
        stored.trace_parent,
    )


class FakeUnitOfWork:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: list[object] = []
        self.notifications = self
        self.deliveries = self
        self.preferences = _Preferences(store)
        self.inbox = _Inbox(store)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def commit(self) -> None:
        return None

    # notifications
    async def add(
        self,
        notification: Notification,
        facts: Mapping[str, str],
        trace_parent: str | None,
        claimed_until: datetime | None = None,
    ) -> list[Delivery]:
        self._store.notifications[notification.id] = notification
        created = []
        for channel in notification.channels:
            delivery_id = uuid4()
            stored = self._store.deliveries[delivery_id] = StoredDelivery(
                delivery_id,
                notification,
                channel,
                dict(facts),
                trace_parent,
                attempts=0 if claimed_until is None else 1,
                due_at=self._store.now if claimed_until is None else claimed_until,
            )
            created.append(_delivery(stored))
        return created

    async def add_many(
        self,
        entries: Sequence[tuple[Notification, Mapping[str, str], str | None]],
        *,
        claimed_until: datetime | None = None,
    ) -> list[Delivery]:
        created = []
        for notification, facts, trace_parent in entries:
            created += await self.add(notification, facts, trace_parent, claimed_until)
        return created

    async def page(
        self, user_id: int, *, after: PageCursor | None, limit: int, unread_only: bool
    ) -> list[Notification]:
        rows = sorted(
            (n for n in self._store.notifications.values() if n.user_id == user_id),
            key=lambda n: (n.created_at, n.id),
            reverse=True,
        )
        if after is not None:
            rows = [n for n in rows if (n.created_at, n.id) < (after.created_at, after.id)]
        if unread_only:
            rows = [n for n in rows if n.read_at is None]
        return rows[:limit]

    async def unread_count(self, user_id: int) -> int:
        return sum(
            1
            for n in self._store.notifications.values()
            if n.user_id == user_id and n.read_at is None
        )

    async def mark_read(
        self, user_id: int, notification_id: UUID, at: datetime
    ) -> Notification | None:
        found = self._store.notifications.get(notification_id)
        if found is None or found.user_id != user_id:
            return None
        if found.read_at is None:
            found = replace(found, read_at=at)
            self._store.notifications[notification_id] = found
        return found

    # deliveries
    async def claim_due(self, now: datetime, limit: int, lease_seconds: float) -> list[Delivery]:
        await asyncio.sleep(0)  # a real claim is a round trip: other tasks run meanwhile
        claimed = []
        for stored in self._store.deliveries.values():
            if stored.status != "pending" or (stored.due_at is not None and stored.due_at > now):
                continue
            stored.attempts += 1
            stored.due_at = now + timedelta(seconds=lease_seconds)
            claimed.append(_delivery(stored))
            if len(claimed) == limit:
                break
        return claimed

    async def mark_sent(self, sent: Sequence[tuple[UUID, datetime]]) -> None:
        for delivery_id, _ in sent:
            self._store.deliveries[delivery_id].status = "sent"

    async def mark_failed(self, delivery_id: UUID, at: datetime, error: str) -> None:
        self._store.deliveries[delivery_id].status = "failed"
        self._store.deliveries[delivery_id].last_error = error

    async def mark_skipped(self, delivery_id: UUID, at: datetime, reason: str) -> None:
        self._store.deliveries[delivery_id].status = "skipped"
        self._store.deliveries[delivery_id].last_error = reason

    async def retry_later(self, delivery_id: UUID, due: datetime, error: str) -> None:
        self._store.deliveries[delivery_id].due_at = due
        self._store.deliveries[delivery_id].last_error = error

    async def next_due(self) -> datetime | None:
        await asyncio.sleep(0)
        due = [
            d.due_at for d in self._store.deliveries.values() if d.status == "pending" and d.due_at
        ]
        return min(due) if due else None


class _Preferences:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def get(self, user_id: int) -> Preferences | None:
        return self._store.preferences.get(user_id)

    async def get_many(self, user_ids: Sequence[int]) -> dict[int, Preferences]:
        return {u: self._store.preferences[u] for u in user_ids if u in self._store.preferences}

    async def put(self, preferences: Preferences) -> None:
        self._store.preferences[preferences.user_id] = preferences


class _Inbox:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def record(self, event_ids: Sequence[UUID]) -> set[UUID]:
        fresh = set(event_ids) - self._store.inbox
        self._store.inbox |= fresh
        return fresh


class FakeDirectory:
    def __init__(self, contacts: dict[int, Contacts]) -> None:
        self.contacts_by_user = contacts
        self.down = False

    async def contacts(self, user_id: int) -> Contacts | None:
        if self.down:
            raise TransientSendError("auth down")
        return self.contacts_by_user.get(user_id)


class FakeSender:
    def __init__(self) -> None:
        self.sent: list[OutgoingMessage] = []
        self.fail_next: list[Exception] = []

    async def send(self, message: OutgoingMessage) -> None:
        if self.fail_next:
            raise self.fail_next.pop(0)
        self.sent.append(message)


class CountingMetrics:
    def __init__(self) -> None:
        self.created: list[Kind] = []
        self.sent: list[Channel] = []
        self.retried: list[Channel] = []
        self.failed: list[Channel] = []
        self.skipped: list[tuple[Channel, str]] = []
        self.too_old: list[Kind] = []

    def notification_created(self, kind: Kind) -> None:
        self.created.append(kind)

    def message_sent(self, channel: Channel, kind: Kind, seconds_since_event: float) -> None:
        self.sent.append(channel)

    def send_retried(self, channel: Channel) -> None:
        self.retried.append(channel)

    def send_failed(self, channel: Channel) -> None:
        self.failed.append(channel)

    def delivery_skipped(self, channel: Channel, reason: str) -> None:
        self.skipped.append((channel, reason))

    def event_too_old(self, kind: Kind) -> None:
        self.too_old.append(kind)


@dataclass
class Fakes:
    store: Store
    directory: FakeDirectory
    email: FakeSender
    sms: FakeSender
    push: FakeSender
    metrics: CountingMetrics

    def uow(self) -> FakeUnitOfWork:
        return FakeUnitOfWork(self.store)


@pytest.fixture
def fakes() -> Fakes:
    return Fakes(
        store=Store(),
        directory=FakeDirectory(
            {7: Contacts(user_id=7, email="an@example.com", phone="0900000007", fullname="An")}
        ),
        email=FakeSender(),
        sms=FakeSender(),
        push=FakeSender(),
        metrics=CountingMetrics(),
    )
