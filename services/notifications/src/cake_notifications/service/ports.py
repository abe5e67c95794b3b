"""What the use cases need from the outside world; adapters/ makes each one real, the unit
tests fake them."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol
from uuid import UUID

from cake_common.db import TransactionPort

from cake_notifications.domain.notifications import (
    Channel,
    Delivery,
    Kind,
    Language,
    Notification,
    PageCursor,
    Preferences,
)


@dataclass(frozen=True, slots=True)
class Contacts:
    """How to reach a user (auth's user directory)."""

    user_id: int
    email: str
    phone: str
    fullname: str = ""
    language: Language | None = None


@dataclass(frozen=True, slots=True)
class RenderedMessage:
    subject: str
    body: str


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message for a channel's sender; ``delivery_id`` makes a repeat recognisable
    (the e-mail's Message-ID, the recorder's key)."""

    delivery_id: UUID
    channel: Channel
    recipient: str
    subject: str
    body: str


class TransientSendError(Exception):
    """The channel could not take the message now (server down, timeout): try again later."""


class PermanentSendError(Exception):
    """The channel refused the message for good (a rejected address): never retried."""


class ContactDirectory(Protocol):
    async def contacts(self, user_id: int) -> Contacts | None:
        """The user's contacts; None for a user auth does not know. Raises
        ``TransientSendError`` while auth cannot be reached."""
        ...


class MessageRenderer(Protocol):
    def render(
        self, kind: Kind, language: Language, variant: str, values: Mapping[str, str]
    ) -> RenderedMessage:
        """The message of ``kind`` in ``language`` for ``variant`` (``inbox`` or a
        channel's value)."""
        ...


class ChannelSender(Protocol):
    async def send(self, message: OutgoingMessage) -> None:
        """Send it; ``TransientSendError`` or ``PermanentSendError`` when not sent."""
        ...


class NotificationRepository(Protocol):
    async def add(
        self, notification: Notification, facts: Mapping[str, str], trace_parent: str | None
    ) -> None:
        """Store it with one pending delivery per channel, due now."""
        ...

    async def add_many(
        self,
        entries: Sequence[tuple[Notification, Mapping[str, str], str | None]],
        *,
        claimed_until: datetime | None = None,
    ) -> list[Delivery]:
        """:meth:`add` for each (notification, facts, trace parent), stored together; the
        deliveries created. With ``claimed_until`` they are stored already claimed (one
        attempt, leased until then) for the caller to send, not due now."""
        ...

    async def page(
        self, user_id: int, *, after: PageCursor | None, limit: int, unread_only: bool
    ) -> list[Notification]: ...

    async def unread_count(self, user_id: int) -> int: ...

    async def mark_read(
        self, user_id: int, notification_id: UUID, at: datetime
    ) -> Notification | None: ...


class DeliveryRepository(Protocol):
    async def claim_due(self, now: datetime, limit: int, lease_seconds: float) -> list[Delivery]:
        """Pending deliveries due by ``now`` that no one holds, leased to the caller for
        ``lease_seconds`` (a crashed dispatcher's lease runs out and another takes over)."""
        ...

    async def mark_sent(self, sent: Sequence[tuple[UUID, datetime]]) -> None:
        """Each (delivery id, when its channel took it) is sent."""
        ...

    async def mark_failed(self, delivery_id: UUID, at: datetime, error: str) -> None: ...

    async def mark_skipped(self, delivery_id: UUID, at: datetime, reason: str) -> None:
        """Nowhere to send it (no contact on the channel): done, neither sent nor failed."""
        ...

    async def retry_later(self, delivery_id: UUID, due: datetime, error: str) -> None: ...

    async def next_due(self) -> datetime | None:
        """When the next pending delivery is due (leases included); None if none is."""
        ...


class DeliveryHandOff(Protocol):
    """Where a consumer commit hands its new deliveries straight to be sent (the
    dispatcher), claimed in the commit itself instead of waiting for a claim."""

    def prepare(self, user_ids: Collection[int]) -> None:
        """Deliveries for these users may follow: their contacts can be looked up now,
        while the commit runs."""
        ...

    def lease_for(self, count: int) -> datetime | None:
        """The lease end to claim ``count`` new deliveries under, or None when they must be
        left pending for the claims instead (stopping, or too many in hand already)."""
        ...

    def hand_off(
        self, deliveries: Sequence[tuple[Delivery, Preferences]], lease_until: datetime
    ) -> None:
        """Send these committed deliveries (claimed until ``lease_until``) now."""
        ...


class PreferenceRepository(Protocol):
    async def get(self, user_id: int) -> Preferences | None: ...

    async def get_many(self, user_ids: Sequence[int]) -> dict[int, Preferences]: ...

    async def put(self, preferences: Preferences) -> None: ...


class Inbox(Protocol):
    async def record(self, event_ids: Sequence[UUID]) -> set[UUID]:
        """Record the ids in this transaction; the ones recorded now (not seen before)."""
        ...


class NotificationsUnitOfWork(TransactionPort, Protocol):
    @property
    def notifications(self) -> NotificationRepository: ...

    @property
    def deliveries(self) -> DeliveryRepository: ...

    @property
    def preferences(self) -> PreferenceRepository: ...

    @property
    def inbox(self) -> Inbox: ...


class UnitOfWorkFactory(Protocol):
    def __call__(self) -> NotificationsUnitOfWork: ...


class NotificationMetrics(Protocol):
    """Business counters (adapters/metrics.py: Prometheus)."""

    def notification_created(self, kind: Kind) -> None: ...

    def message_sent(self, channel: Channel, kind: Kind, seconds_since_event: float) -> None: ...

    def send_retried(self, channel: Channel) -> None: ...

    def send_failed(self, channel: Channel) -> None: ...

    def delivery_skipped(self, channel: Channel, reason: str) -> None: ...

    def event_too_old(self, kind: Kind) -> None: ...
