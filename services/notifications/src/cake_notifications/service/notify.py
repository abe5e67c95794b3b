"""Events in: each voucher or payment event becomes one in-app notification and one pending
delivery per channel the user allows, in ONE transaction with the inbox, so a redelivered
event changes nothing. An event older than the maximum age (a new consumer group replaying
a topic's history) is recorded in the inbox and counted, but nobody is notified."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import uuid4

from cake_common.logging import get_logger

from cake_notifications.domain.notifications import (
    Delivery,
    EventFacts,
    Notification,
    Preferences,
    channels_for,
    too_old_to_notify,
)
from cake_notifications.service.ports import (
    DeliveryHandOff,
    MessageRenderer,
    NotificationMetrics,
    UnitOfWorkFactory,
)

INBOX_VARIANT = "inbox"
"""The template variant of the in-app entry."""

DUPLICATE = "duplicate"
CREATED = "notified"
TOO_OLD = "too_old"
"""Outcome of an event older than the maximum age: in the inbox, not notified."""

_log = get_logger(__name__)


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class IncomingEvent:
    facts: EventFacts
    trace_parent: str | None = None


class NotifyUsers:
    def __init__(
        self,
        uow_factory: UnitOfWorkFactory,
        renderer: MessageRenderer,
        metrics: NotificationMetrics,
        on_committed: Callable[[Sequence[int]], None] = lambda _users: None,
        *,
        hand_off: DeliveryHandOff | None = None,
        max_event_age: timedelta = timedelta(hours=24),
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._uow_factory = uow_factory
        self._renderer = renderer
        self._metrics = metrics
        self._on_committed = on_committed
        """Called after a commit that created deliveries left pending, with their users:
        wakes the dispatcher (and warms its contacts cache)."""
        self._hand_off = hand_off
        """Takes the new deliveries claimed in the commit and sends them at once: waiting
        for a dispatch loop's claim was the longest step from event to e-mail under load
        (bench/notifications.py). When it has no room they are left pending instead."""
        self._max_event_age = max_event_age
        self._clock = clock

    async def accept(self, events: Sequence[IncomingEvent]) -> list[str]:
        """Store the batch's notifications (inbox inside); one outcome per event, in order."""
        created: list[Notification] = []
        stored: list[tuple[Notification, Mapping[str, str], str | None]] = []
        outcomes: list[str] = []
        too_old: list[EventFacts] = []
        chosen_by_user: dict[int, Preferences] = {}
        handed: list[Delivery] = []
        lease_until: datetime | None = None
        now = self._clock()
        if self._hand_off is not None:
            # The contact lookups (a call to auth each) overlap the transaction.
            self._hand_off.prepare({event.facts.user_id for event in events})
        async with self._uow_factory() as uow:
            fresh = await uow.inbox.record([event.facts.event_id for event in events])
            users = sorted({event.facts.user_id for event in events})
            preferences = await uow.preferences.get_many(users)
            for event in events:
                facts = event.facts
                if facts.event_id not in fresh:
                    outcomes.append(DUPLICATE)
                    continue
                fresh.discard(facts.event_id)  # the same id twice in one batch: once
                if too_old_to_notify(facts.occurred_at, now, self._max_event_age):
                    too_old.append(facts)
                    outcomes.append(TOO_OLD)
                    continue
                chosen = preferences.get(facts.user_id) or Preferences(facts.user_id)
                chosen_by_user[facts.user_id] = chosen
                language = chosen.language_or(None)
                entry = self._renderer.render(facts.kind, language, INBOX_VARIANT, facts.values)
                notification = Notification(
                    id=uuid4(),
                    user_id=facts.user_id,
                    event_id=facts.event_id,
                    kind=facts.kind,
                    title=entry.subject,
                    body=entry.body,
                    created_at=facts.occurred_at,
                    channels=channels_for(facts.kind, chosen),
                )
                stored.append((notification, facts.values, event.trace_parent))
                created.append(notification)
                outcomes.append(CREATED)
            channels = sum(len(notification.channels) for notification in created)
            if self._hand_off is not None and channels:
                lease_until = self._hand_off.lease_for(channels)
            handed = await uow.notifications.add_many(stored, claimed_until=lease_until)
            await uow.commit()
        for notification in created:
            self._metrics.notification_created(notification.kind)
        for facts in too_old:
            self._metrics.event_too_old(facts.kind)
        if too_old:
            _log.info(
                "events too old to notify, recorded and skipped",
                count=len(too_old),
                oldest=min(facts.occurred_at for facts in too_old).isoformat(),
                max_age_seconds=self._max_event_age.total_seconds(),
            )
        if lease_until is not None and self._hand_off is not None:
            if handed:
                self._hand_off.hand_off(
                    [(delivery, chosen_by_user[delivery.user_id]) for delivery in handed],
                    lease_until,
                )
            return outcomes
        users = sorted({n.user_id for n in created if n.channels})
        if users:
            self._on_committed(users)
        return outcomes
