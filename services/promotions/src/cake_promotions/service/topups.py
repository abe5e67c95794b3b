"""Mobile top-up as a saga: reserve, charge outside any transaction, then confirm or
compensate (see :mod:`cake_promotions.domain.topups` for the states).

Step 1 locks the voucher row (``SELECT … FOR UPDATE``) only for the few statements that
check it and mark it reserved, so concurrent top-ups with one voucher run that step one
after another and only the first finds it active. No lock or pooled connection is held
while the bank is called.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal

from cake_common.errors import (
    Aborted,
    AlreadyExists,
    CakeError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    Unavailable,
)
from cake_common.logging import get_logger

from cake_promotions.domain.money import calculate_discount
from cake_promotions.domain.payments import PaymentRequest
from cake_promotions.domain.topups import (
    IDEMPOTENCY_KEY_REUSED_MESSAGE,
    MAX_IDEMPOTENCY_KEY_LENGTH,
    PAYMENT_FAILED_MESSAGE,
    PAYMENT_PENDING_MESSAGE,
    TOPUP_IN_PROGRESS_MESSAGE,
    PaymentOutcome,
    SagaStep,
    TopupCommand,
    TopupReceipt,
    TopupRecord,
    TopupStatus,
    new_transaction_id,
    next_step,
)
from cake_promotions.domain.vouchers import Voucher, check_spendable
from cake_promotions.metrics import PromotionsMetrics
from cake_promotions.service.clock import Clock, utc_now
from cake_promotions.service.ports import PaymentGateway, PromotionsUnitOfWork, UnitOfWorkFactory

IDEMPOTENCY_KEY_FIELD = "idempotency-key"
IDEMPOTENT_REPLAYED_HEADER = "idempotent-replayed"
"""Response header (``true``) on a top-up answered from an earlier request's receipt."""
PAYMENT_FAILED_REASON = "PAYMENT_FAILED"
PAYMENT_PENDING_REASON = "PAYMENT_PENDING"
TOPUP_IN_PROGRESS_REASON = "TOPUP_IN_PROGRESS"

AfterCharge = Callable[[], None]
"""Runs right after the bank answered a charge, before it is confirmed (drills kill the
process here to prove a crash between charge and confirm loses nothing)."""

_log = get_logger(__name__)


def _checked_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH or not key.isprintable():
        raise InvalidArgument(
            "Validation failed",
            [
                FieldViolation(
                    IDEMPOTENCY_KEY_FIELD,
                    f"must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} printable characters",
                )
            ],
        )
    return key


class TopupSettlement:
    """The saga's last step, shared by the request and the reconciler: one short
    transaction that applies the bank's final answer to a pending top-up, at most once."""

    def __init__(
        self, uow_factory: UnitOfWorkFactory, metrics: PromotionsMetrics, *, clock: Clock
    ) -> None:
        self._uow_factory = uow_factory
        self._metrics = metrics
        self._clock = clock

    async def settle(self, transaction_id: str, outcome: PaymentOutcome) -> TopupRecord:
        """The top-up after applying ``outcome`` (unchanged if it was settled already, or
        if the outcome is unknown)."""
        async with self._uow_factory() as uow:
            record = await uow.topups.get(transaction_id, for_update=True)
            if record is None:
                raise LookupError(f"no top-up {transaction_id}")
            step = next_step(record.status, outcome)
            if step is SagaStep.CONFIRM:
                record = await self._confirm(uow, record)
            elif step is SagaStep.COMPENSATE:
                record = await self._compensate(uow, record)
            else:
                return record
            await uow.commit()
        self._metrics.topups_settled.labels(result=record.status.value).inc()
        _log.info(
            "top-up settled",
            transaction_id=transaction_id,
            status=record.status.value,
            voucher_id=record.voucher_id,
        )
        return record

    async def _confirm(self, uow: PromotionsUnitOfWork, record: TopupRecord) -> TopupRecord:
        now = self._clock()
        settled = replace(record, status=TopupStatus.SUCCEEDED)
        await uow.topups.set_status(record.transaction_id, settled.status, now)
        if record.voucher_id is not None:
            voucher = await uow.vouchers.mark_used(
                record.voucher_id,
                used_at=now,
                used_amount=record.original_amount,
                discount_amount=record.discount_amount,
                transaction_reference=record.transaction_id,
            )
            await uow.participations.mark_voucher_used(voucher.user_promotion_id, now)
            await uow.events.voucher_used(
                voucher,
                transaction_id=record.transaction_id,
                used_amount=record.original_amount,
                discount_amount=record.discount_amount,
                used_at=now,
            )
            self._metrics.vouchers_used.inc()
        await uow.events.payment_processed(settled, processed_at=now)
        if record.idempotency_key is not None:
            await uow.idempotency_keys.store_receipt(
                record.user_id, record.idempotency_key, settled.receipt()
            )
        return settled

    async def _compensate(self, uow: PromotionsUnitOfWork, record: TopupRecord) -> TopupRecord:
        now = self._clock()
        settled = replace(record, status=TopupStatus.FAILED)
        await uow.topups.set_status(record.transaction_id, settled.status, now)
        if record.voucher_id is not None:
            await uow.vouchers.release(record.voucher_id, now)
        await uow.events.payment_processed(settled, processed_at=now)
        if record.idempotency_key is not None:
            # A failed top-up answers nothing to replay: a retry may try again.
            await uow.idempotency_keys.forget(record.user_id, record.idempotency_key)
        return settled


class TopupProcessing:
    def __init__(
        self,
        uow_factory: UnitOfWorkFactory,
        payments: PaymentGateway,
        metrics: PromotionsMetrics,
        *,
        pending_timeout: timedelta = timedelta(seconds=30),
        reconcile_interval: timedelta = timedelta(seconds=10),
        charge_deadline: timedelta = timedelta(seconds=5),
        after_charge: AfterCharge | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self._uow_factory = uow_factory
        self._payments = payments
        self._metrics = metrics
        self._pending_timeout = pending_timeout
        self._reconcile_interval = reconcile_interval
        self._charge_deadline = charge_deadline
        self._after_charge = after_charge
        self._clock = clock
        self.settlement = TopupSettlement(uow_factory, metrics, clock=clock)

    async def topup(
        self, command: TopupCommand, *, idempotency_key: str | None = None
    ) -> TopupReceipt:
        """Top up, or with an ``idempotency_key`` already used by this user for the same
        request, return that first request's receipt without charging again (ABORTED with
        a ``retry-after`` while that first request is still pending)."""
        key = _checked_idempotency_key(idempotency_key)
        try:
            reserved = await self._reserve(command, key)
            if isinstance(reserved, TopupReceipt):
                self._metrics.topups.labels(result="replayed").inc()
                return reserved
            receipt = await self._charge_and_settle(reserved)
        except CakeError as error:
            if error.reason not in (PAYMENT_FAILED_REASON, PAYMENT_PENDING_REASON):
                self._metrics.topups.labels(result="rejected").inc()
            raise
        self._metrics.topups.labels(result="succeeded").inc()
        return receipt

    # -- step 1: reserve ----------------------------------------------------------------------

    async def _reserve(self, command: TopupCommand, key: str | None) -> TopupRecord | TopupReceipt:
        """Record the top-up pending and reserve its voucher (one short transaction); or the
        stored receipt of an earlier request with the same key."""
        now = self._clock()
        transaction_id = new_transaction_id(now)
        async with self._uow_factory() as uow:
            if key is not None:
                replayed = await self._claim_or_replay(uow, command, key, transaction_id, now)
                if replayed is not None:
                    return replayed
            voucher: Voucher | None = None
            discount = Decimal("0.00")
            if command.voucher_code is not None:
                found = await uow.vouchers.get_by_code(command.voucher_code, for_update=True)
                try:
                    voucher = check_spendable(
                        found, user_id=command.user_id, amount=command.amount, now=now
                    )
                except FailedPrecondition:
                    await uow.rollback()
                    if found is not None and found.status_at(now) is not found.status:
                        # Expired while active: store what it reads as (without the claim).
                        await uow.vouchers.expire_overdue(now, code=found.code)
                        await uow.commit()
                    raise
                discount = calculate_discount(
                    command.amount, voucher.discount_percentage, voucher.max_discount_amount
                )
                await uow.vouchers.reserve(voucher.id, until=now + self._pending_timeout, now=now)
            record = TopupRecord(
                transaction_id=transaction_id,
                user_id=command.user_id,
                phone_number=command.phone_number,
                original_amount=command.amount,
                discount_amount=discount,
                final_amount=command.amount - discount,
                voucher_id=voucher.id if voucher is not None else None,
                payment_method=command.payment_method,
                status=TopupStatus.PENDING,
                created_at=now,
                voucher_code=command.voucher_code,
                idempotency_key=key,
            )
            await uow.topups.add(record)
            await uow.events.payment_processed(record, processed_at=now)
            await uow.commit()
        return record

    async def _claim_or_replay(
        self,
        uow: PromotionsUnitOfWork,
        command: TopupCommand,
        key: str,
        transaction_id: str,
        now: datetime,
    ) -> TopupReceipt | None:
        fingerprint = command.fingerprint()
        if await uow.idempotency_keys.claim(command.user_id, key, fingerprint, transaction_id):
            return None
        stored = await uow.idempotency_keys.get(command.user_id, key)
        if stored is None:  # pragma: no cover - deleted between the two statements
            raise Aborted(TOPUP_IN_PROGRESS_MESSAGE, reason=TOPUP_IN_PROGRESS_REASON)
        if stored.fingerprint != fingerprint:
            raise AlreadyExists(IDEMPOTENCY_KEY_REUSED_MESSAGE, reason="IDEMPOTENCY_KEY_REUSED")
        if stored.receipt is not None:
            return replace(stored.receipt, replayed=True)
        pending = (
            await uow.topups.get(stored.transaction_id)
            if stored.transaction_id is not None
            else None
        )
        self._metrics.topups.labels(result="in_progress").inc()
        raise Aborted(
            TOPUP_IN_PROGRESS_MESSAGE,
            reason=TOPUP_IN_PROGRESS_REASON,
            metadata={"transactionId": stored.transaction_id or ""},
            retry_after_seconds=self._retry_after(pending.created_at if pending else now, now),
        )

    def _retry_after(self, created_at: datetime, now: datetime) -> int:
        """Seconds until a retry may find the top-up settled: soon while the bank may still
        answer, else when the reconciler will have settled it."""
        if now - created_at < self._charge_deadline:
            return 1
        settled_by = created_at + self._pending_timeout + self._reconcile_interval
        return max(1, math.ceil((settled_by - now).total_seconds()))

    # -- steps 2 and 3: charge, then confirm or compensate ------------------------------------

    async def _charge_and_settle(self, record: TopupRecord) -> TopupReceipt:
        payment = await self._payments.charge(
            PaymentRequest(
                transaction_id=record.transaction_id,
                user_id=record.user_id,
                phone_number=record.phone_number,
                amount=record.final_amount,
                original_amount=record.original_amount,
                payment_method=record.payment_method,
            )
        )
        if self._after_charge is not None:
            self._after_charge()
        if payment.outcome is PaymentOutcome.UNKNOWN:
            self._metrics.topups.labels(result="pending").inc()
            _log.warning(
                "payment outcome unknown, top-up left pending for the reconciler",
                transaction_id=record.transaction_id,
                reason=payment.reason,
            )
            raise Unavailable(
                PAYMENT_PENDING_MESSAGE,
                reason=PAYMENT_PENDING_REASON,
                metadata={"transactionId": record.transaction_id},
                retry_after_seconds=self._retry_after(record.created_at, self._clock()),
            )
        settled = await self.settlement.settle(record.transaction_id, payment.outcome)
        if settled.status is not TopupStatus.SUCCEEDED:
            self._metrics.topups.labels(result="payment_failed").inc()
            _log.warning(
                "payment declined", transaction_id=record.transaction_id, reason=payment.reason
            )
            raise FailedPrecondition(PAYMENT_FAILED_MESSAGE, reason=PAYMENT_FAILED_REASON)
        return settled.receipt()
