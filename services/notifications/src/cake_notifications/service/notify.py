"""Events in: each voucher or payment event becomes one in-app notification and one pending
delivery per channel the user allows, in ONE transaction with the inbox, so a redelivered
event changes nothing."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from uuid import uuid4

from cake_common.logging import get_logger

from cake_notifications.domain.notifications import (
    EventFacts,
    Notification,
    Preferences,
    channels_for,
)
from cake_notifications.service.ports import (
    MessageRenderer,
    NotificationMetrics,
    UnitOfWorkFactory,
)

INBOX_VARIANT = "inbox"
"""The template variant of the in-app entry."""

DUPLICATE = "duplicate"
CREATED = "notified"

_log = get_logger(__name__)


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
        on_committed: Callable[[], None] = lambda: None,
    ) -> None:
        self._uow_factory = uow_factory
        self._renderer = renderer
        self._metrics = metrics
        self._on_committed = on_committed
        """Called after a commit that created deliveries: wakes the dispatcher."""

    async def accept(self, events: Sequence[IncomingEvent]) -> list[str]:
        """Store the batch's notifications (inbox inside); one outcome per event, in order."""
        created: list[Notification] = []
        stored: list[tuple[Notification, Mapping[str, str], str | None]] = []
        outcomes: list[str] = []
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
                chosen = preferences.get(facts.user_id) or Preferences(facts.user_id)
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
            await uow.notifications.add_many(stored)
            await uow.commit()
        for notification in created:
            self._metrics.notification_created(notification.kind)
        if any(notification.channels for notification in created):
            self._on_committed()
        return outcomes
