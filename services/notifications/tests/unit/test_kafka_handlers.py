from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

from cake.events.v1 import envelope_pb2, payloads_pb2
from cake_common.consumer import ConsumedEvent
from cake_notifications.adapters.templates import JinjaRenderer
from cake_notifications.entrypoints.kafka import (
    NotifyHandler,
    payment_facts,
    voucher_issued_facts,
)
from cake_notifications.service.notify import NotifyUsers
from google.protobuf.timestamp_pb2 import Timestamp


def ts(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


PROCESSED = datetime(2026, 12, 5, tzinfo=UTC)


def payment(status: int) -> ConsumedEvent[payloads_pb2.PaymentProcessed]:
    payload = payloads_pb2.PaymentProcessed(
        transaction_id="TXN-1-abcdef",
        user_id=7,
        phone_number="0900000007",
        original_amount="100.00",
        discount_amount="30.00",
        final_amount="70.00",
        voucher_code="CAKE-ABCDEFGH",
        success=status == payloads_pb2.PAYMENT_STATUS_SUCCEEDED,
        processed_at=ts(PROCESSED),
        status=status,  # type: ignore[arg-type]
    )
    return ConsumedEvent(uuid4(), payload, envelope_pb2.EventEnvelope())


def test_voucher_facts() -> None:
    payload = payloads_pb2.VoucherIssued(
        voucher_id=1,
        code="CAKE-ABCDEFGH",
        user_id=7,
        campaign_id=2,
        discount_percentage="30.00",
        expires_at=ts(datetime(2027, 1, 4, 23, 0, tzinfo=UTC)),
        issued_at=ts(datetime(2026, 12, 5, tzinfo=UTC)),
    )
    facts = voucher_issued_facts(ConsumedEvent(uuid4(), payload, envelope_pb2.EventEnvelope()))
    assert facts.values["expires_on"] == "2027-01-04"
    assert facts.occurred_at == datetime(2026, 12, 5, tzinfo=UTC)


def test_pending_payments_are_not_notified_resolved_ones_are() -> None:
    assert payment_facts(payment(payloads_pb2.PAYMENT_STATUS_PENDING)) is None
    succeeded = payment_facts(payment(payloads_pb2.PAYMENT_STATUS_SUCCEEDED))
    failed = payment_facts(payment(payloads_pb2.PAYMENT_STATUS_FAILED))
    assert succeeded is not None and succeeded.values["succeeded"] == "yes"
    assert failed is not None and failed.values["succeeded"] == ""


async def test_handler_outcomes_keep_the_batch_order(fakes) -> None:
    # The clock is pinned a minute after the payment: with the wall clock, the event would
    # turn "too old" a day after PROCESSED.
    notify = NotifyUsers(
        fakes.uow, JinjaRenderer(), fakes.metrics, clock=lambda: PROCESSED + timedelta(minutes=1)
    )
    handler = NotifyHandler(notify, payment_facts)
    done = payment(payloads_pb2.PAYMENT_STATUS_SUCCEEDED)
    outcomes = await handler([payment(payloads_pb2.PAYMENT_STATUS_PENDING), done, done])
    assert outcomes == ["pending_skipped", "notified", "duplicate"]
