"""Kafka handlers: voucher and payment events → ``NotifyUsers.accept``.

Registered on the shared consumer (``cake_common.consumer.EventConsumer``) in
``bootstrap.build_consumer``; it polls, decodes through the event registry, dead-letters
events that break their contract, retries and restarts. Each handler turns its batch into
the domain's :class:`EventFacts` and stores it in one unit of work with the inbox.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from cake.events.v1 import payloads_pb2
from cake_common.consumer import ConsumedEvent
from google.protobuf.timestamp_pb2 import Timestamp

from cake_notifications.domain.notifications import EventFacts, Kind
from cake_notifications.service.notify import IncomingEvent, NotifyUsers

SKIPPED_PENDING = "pending_skipped"
"""Outcome of a PAYMENT_PROCESSED that is still pending: its resolution is notified."""


def _time(value: Timestamp) -> datetime:
    return value.ToDatetime(tzinfo=UTC)


def voucher_issued_facts(event: ConsumedEvent[payloads_pb2.VoucherIssued]) -> EventFacts:
    p = event.payload
    return EventFacts(
        event_id=event.event_id,
        user_id=p.user_id,
        kind=Kind.VOUCHER_ISSUED,
        occurred_at=_time(p.issued_at),
        values={
            "code": p.code,
            "discount_percentage": p.discount_percentage,
            "expires_on": _time(p.expires_at).date().isoformat(),
            "campaign_id": str(p.campaign_id),
        },
    )


def voucher_used_facts(event: ConsumedEvent[payloads_pb2.VoucherUsed]) -> EventFacts:
    p = event.payload
    return EventFacts(
        event_id=event.event_id,
        user_id=p.user_id,
        kind=Kind.VOUCHER_USED,
        occurred_at=_time(p.used_at),
        values={
            "code": p.code,
            "transaction_id": p.transaction_id,
            "used_amount": p.used_amount,
            "discount_amount": p.discount_amount,
        },
    )


def payment_facts(event: ConsumedEvent[payloads_pb2.PaymentProcessed]) -> EventFacts | None:
    """The facts of a resolved payment; None while it is pending."""
    p = event.payload
    if p.status == payloads_pb2.PAYMENT_STATUS_PENDING:
        return None
    succeeded = (
        p.status == payloads_pb2.PAYMENT_STATUS_SUCCEEDED
        if p.status != payloads_pb2.PAYMENT_STATUS_UNSPECIFIED
        else p.success
    )
    return EventFacts(
        event_id=event.event_id,
        user_id=p.user_id,
        kind=Kind.PAYMENT_PROCESSED,
        occurred_at=_time(p.processed_at),
        values={
            "transaction_id": p.transaction_id,
            "phone_number": p.phone_number,
            "original_amount": p.original_amount,
            "discount_amount": p.discount_amount,
            "final_amount": p.final_amount,
            "voucher_code": p.voucher_code,
            "succeeded": "yes" if succeeded else "",
        },
    )


class NotifyHandler:
    """One event type's handler: facts from each event, then one ``accept`` for the batch."""

    def __init__(
        self,
        notify: NotifyUsers,
        facts: Callable[[Any], EventFacts | None],
    ) -> None:
        self._notify = notify
        self._facts = facts

    async def __call__(self, events: Sequence[ConsumedEvent[Any]]) -> list[str]:
        outcomes: list[str | None] = []
        incoming: list[IncomingEvent] = []
        for event in events:
            facts = self._facts(event)
            if facts is None:
                outcomes.append(SKIPPED_PENDING)
            else:
                outcomes.append(None)
                incoming.append(IncomingEvent(facts, event.trace_parent))
        accepted = iter(await self._notify.accept(incoming) if incoming else [])
        return [outcome if outcome is not None else next(accepted) for outcome in outcomes]
