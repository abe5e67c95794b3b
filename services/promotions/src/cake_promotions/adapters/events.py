"""The promotions events, written to the outbox in the caller's transaction.

Every event's aggregate is the user (the registry's ``aggregate_type``, id = user id), so the
relay keys them by user and one user's promotion events stay ordered on their topic.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

from cake.events.v1 import payloads_pb2, registry
from cake_common.audit import AuditingOutboxRecorder
from cake_common.outbox import OutboxEvent
from google.protobuf.timestamp_pb2 import Timestamp

from cake_promotions.domain.enrollment import Participation
from cake_promotions.domain.topups import TopupRecord, TopupStatus
from cake_promotions.domain.vouchers import Voucher
from cake_promotions.service.ports import NewEnrollmentEvents

_PAYMENT_STATUS = {
    TopupStatus.PENDING: payloads_pb2.PAYMENT_STATUS_PENDING,
    TopupStatus.SUCCEEDED: payloads_pb2.PAYMENT_STATUS_SUCCEEDED,
    TopupStatus.FAILED: payloads_pb2.PAYMENT_STATUS_FAILED,
}


def _timestamp(instant: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(instant)
    return stamp


def _money(amount: Decimal) -> str:
    # The payloads carry money as exact decimal strings ("50000.00"), never as doubles.
    return f"{amount:.2f}"


def _promotion_enrollment(
    participation: Participation, enrolled_at: datetime, voucher_issued: bool
) -> payloads_pb2.PromotionEnrollment:
    return payloads_pb2.PromotionEnrollment(
        user_id=participation.user_id,
        campaign_id=participation.campaign_id,
        participation_order=participation.participation_order,
        enrolled_at=_timestamp(enrolled_at),
        voucher_issued=voucher_issued,
    )


def _voucher_issued(voucher: Voucher, campaign_id: int) -> payloads_pb2.VoucherIssued:
    return payloads_pb2.VoucherIssued(
        voucher_id=voucher.id,
        code=voucher.code,
        user_id=voucher.user_id,
        campaign_id=campaign_id,
        discount_percentage=_money(voucher.discount_percentage),
        expires_at=_timestamp(voucher.expires_at),
        issued_at=_timestamp(voucher.issued_at),
    )


class PromotionEvents(AuditingOutboxRecorder):
    async def enrolled(self, enrollments: Sequence[NewEnrollmentEvents]) -> None:
        """The events of many enrollments in one statement, each user's two in order."""
        events = []
        for item in enrollments:
            participation, voucher = item.participation, item.voucher
            events += [
                OutboxEvent(
                    event=registry.PROMOTION_ENROLLMENT,
                    aggregate_id=participation.user_id,
                    payload=_promotion_enrollment(participation, voucher.issued_at, True),
                    occurred_at=voucher.issued_at,
                    trace_parent=item.trace_parent,
                ),
                OutboxEvent(
                    event=registry.VOUCHER_ISSUED,
                    aggregate_id=voucher.user_id,
                    payload=_voucher_issued(voucher, participation.campaign_id),
                    occurred_at=voucher.issued_at,
                    trace_parent=item.trace_parent,
                ),
            ]
        await self._writer.add_many(self._session, events)

    async def voucher_used(
        self,
        voucher: Voucher,
        *,
        transaction_id: str,
        used_amount: Decimal,
        discount_amount: Decimal,
        used_at: datetime,
    ) -> None:
        await self._writer.add(
            self._session,
            registry.VOUCHER_USED,
            aggregate_id=voucher.user_id,
            payload=payloads_pb2.VoucherUsed(
                voucher_id=voucher.id,
                code=voucher.code,
                user_id=voucher.user_id,
                transaction_id=transaction_id,
                used_amount=_money(used_amount),
                discount_amount=_money(discount_amount),
                used_at=_timestamp(used_at),
            ),
            occurred_at=used_at,
        )

    async def payment_processed(self, record: TopupRecord, *, processed_at: datetime) -> None:
        """The payment's state: pending when the top-up is recorded, then how it ended."""
        await self._writer.add(
            self._session,
            registry.PAYMENT_PROCESSED,
            aggregate_id=record.user_id,
            payload=payloads_pb2.PaymentProcessed(
                transaction_id=record.transaction_id,
                user_id=record.user_id,
                phone_number=record.phone_number,
                original_amount=_money(record.original_amount),
                discount_amount=_money(record.discount_amount),
                final_amount=_money(record.final_amount),
                voucher_code=record.voucher_code or "",
                success=record.status is TopupStatus.SUCCEEDED,
                processed_at=_timestamp(processed_at),
                status=_PAYMENT_STATUS[record.status],
            ),
            occurred_at=processed_at,
        )
