"""The first-login handler: auth's USER_FIRST_LOGIN events become enrollments.

Registered on the generic Kafka consumer (``cake_common.consumer.EventConsumer``, wired in
``bootstrap.first_login_consumer``), which polls, decodes through the event registry, retries,
dead-letters and restarts. This handler gets each poll batch's first logins (up to
``consumer_max_batch``, every partition assigned, one user's events in partition order) and
enrolls them in ONE database transaction (``FirstLoginEnrollment.enroll_batch``,
docs/enrollment.md): the inbox, the slots, the participations, the vouchers and the outbox
events of the whole batch. The effect is exactly-once because every event id goes into the
inbox in that transaction; the consumer commits the offsets only after it commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC

from cake.events.v1 import payloads_pb2
from cake_common.consumer import ConsumedEvent

from cake_promotions.domain.enrollment import FirstLogin
from cake_promotions.service.enrollment import FirstLoginEnrollment

FirstLoginEvent = ConsumedEvent[payloads_pb2.UserFirstLogin]

DUPLICATE = "duplicate"
"""Outcome of an event the inbox had already seen (``consumed_events_total{result}``)."""


def first_login(event: FirstLoginEvent) -> FirstLogin:
    """The domain's first login in a decoded USER_FIRST_LOGIN event."""
    return FirstLogin(
        user_id=event.payload.user_id,
        login_at=event.payload.login_at.ToDatetime(tzinfo=UTC),
        event_id=event.event_id,
    )


class FirstLoginHandler:
    def __init__(self, enrollment: FirstLoginEnrollment) -> None:
        self._enrollment = enrollment

    async def __call__(self, events: Sequence[FirstLoginEvent]) -> list[str]:
        """Enroll the batch in one transaction; one outcome label per event, in order."""
        outcomes = await self._enrollment.enroll_batch(
            [first_login(event) for event in events],
            trace_parents=[event.trace_parent for event in events],
        )
        return [DUPLICATE if outcome is None else outcome.result.value for outcome in outcomes]
