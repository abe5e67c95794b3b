"""Mobile top-up: spend at most one voucher once, charge through the payment port.

One transaction per top-up: the voucher row is locked (``SELECT … FOR UPDATE``) before its
status is checked, so concurrent top-ups with one voucher run one after another and only
the first finds it active. The payment is charged inside that transaction, while the lock
is held; a declined payment rolls everything back, leaving the voucher active.
"""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

from cake_common.errors import (
    AlreadyExists,
    CakeError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
)
from cake_common.logging import get_logger

from cake_promotions.adapters.receipts import decode_receipt, encode_receipt
from cake_promotions.domain.money import calculate_discount
from cake_promotions.domain.payments import PaymentGateway, PaymentRequest
from cake_promotions.domain.topups import (
    IDEMPOTENCY_KEY_REUSED_MESSAGE,
    MAX_IDEMPOTENCY_KEY_LENGTH,
    PAYMENT_FAILED_MESSAGE,
    TOPUP_SUCCEEDED_MESSAGE,
    TopupCommand,
    TopupReceipt,
    TopupRecord,
    TopupStatus,
    new_transaction_id,
)
from cake_promotions.domain.vouchers import Voucher, check_spendable
from cake_promotions.metrics import PromotionsMetrics
from cake_promotions.service.clock import Clock, utc_now
from cake_promotions.service.unit_of_work import PromotionsUnitOfWork, UnitOfWorkFactory

IDEMPOTENCY_KEY_FIELD = "idempotency-key"
IDEMPOTENT_REPLAYED_HEADER = "idempotent-replayed"
"""Response header (``true``) on a top-up answered from an earlier request's receipt."""
PAYMENT_FAILED_REASON = "PAYMENT_FAILED"

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


class TopupProcessing:
    def __init__(
        self,
        uow_factory: UnitOfWorkFactory,
        payments: PaymentGateway,
        metrics: PromotionsMetrics,
        *,
        clock: Clock = utc_now,
    ) -> None:
        self._uow_factory = uow_factory
        self._payments = payments
        self._metrics = metrics
        self._clock = clock

    async def topup(
        self, command: TopupCommand, *, idempotency_key: str | None = None
    ) -> TopupReceipt:
        """Top up, or with an ``idempotency_key`` already used by this user for the same
        request, return that first request's receipt without charging again."""
        key = _checked_idempotency_key(idempotency_key)
        try:
            async with self._uow_factory() as uow:
                if key is not None:
                    replayed = await self._claim_or_replay(uow, command, key)
                    if replayed is not None:
                        self._metrics.topups.labels(result="replayed").inc()
                        return replayed
                receipt = await self._topup(uow, command, key)
        except CakeError as error:
            if error.reason != PAYMENT_FAILED_REASON:
                self._metrics.topups.labels(result="rejected").inc()
            raise
        self._metrics.topups.labels(result="succeeded").inc()
        if receipt.voucher_code is not None:
            self._metrics.vouchers_used.inc()
        return receipt

    @staticmethod
    async def _claim_or_replay(
        uow: PromotionsUnitOfWork, command: TopupCommand, key: str
    ) -> TopupReceipt | None:
        fingerprint = command.fingerprint()
        if await uow.idempotency_keys.claim(command.user_id, key, fingerprint):
            return None
        stored = await uow.idempotency_keys.get(command.user_id, key)
        # A key row is only ever committed with its response (the claim commits together
        # with the top-up or not at all), and the claim above waited for any in-flight one.
        stored_fingerprint, response = stored if stored is not None else ("", None)
        if response is None:  # pragma: no cover - see above
            raise RuntimeError("idempotency key without a stored response")
        if stored_fingerprint != fingerprint:
            raise AlreadyExists(IDEMPOTENCY_KEY_REUSED_MESSAGE, reason="IDEMPOTENCY_KEY_REUSED")
        return replace(decode_receipt(response), replayed=True)

    async def _topup(
        self, uow: PromotionsUnitOfWork, command: TopupCommand, key: str | None
    ) -> TopupReceipt:
        now = self._clock()
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
        final_amount = command.amount - discount
        transaction_id = new_transaction_id(now)
        record = TopupRecord(
            transaction_id=transaction_id,
            user_id=command.user_id,
            phone_number=command.phone_number,
            original_amount=command.amount,
            discount_amount=discount,
            final_amount=final_amount,
            voucher_id=voucher.id if voucher is not None else None,
            payment_method=command.payment_method,
            status=TopupStatus.SUCCEEDED,
            created_at=now,
        )
        payment = await self._payments.charge(
            PaymentRequest(
                transaction_id=transaction_id,
                user_id=command.user_id,
                phone_number=command.phone_number,
                amount=final_amount,
                original_amount=command.amount,
                payment_method=command.payment_method,
            )
        )
        if not payment.approved:
            await self._record_declined(uow, record, voucher)
            _log.warning("payment declined", transaction_id=transaction_id, reason=payment.reason)
            raise FailedPrecondition(PAYMENT_FAILED_MESSAGE, reason=PAYMENT_FAILED_REASON)

        if voucher is not None:
            await uow.vouchers.mark_used(
                voucher.id,
                used_at=now,
                used_amount=command.amount,
                discount_amount=discount,
                transaction_reference=transaction_id,
            )
            await uow.participations.mark_voucher_used(voucher.user_promotion_id, now)
            await uow.events.voucher_used(
                voucher,
                transaction_id=transaction_id,
                used_amount=command.amount,
                discount_amount=discount,
                used_at=now,
            )
        await uow.topups.add(record)
        await uow.events.payment_processed(record, voucher_code=command.voucher_code)
        receipt = TopupReceipt(
            success=True,
            transaction_id=transaction_id,
            original_amount=command.amount,
            discount_amount=discount,
            final_amount=final_amount,
            phone_number=command.phone_number,
            voucher_code=command.voucher_code,
            message=TOPUP_SUCCEEDED_MESSAGE,
        )
        if key is not None:
            await uow.idempotency_keys.store_response(command.user_id, key, encode_receipt(receipt))
        await uow.commit()
        _log.info(
            "top-up succeeded",
            transaction_id=transaction_id,
            voucher_id=voucher.id if voucher is not None else None,
        )
        return receipt

    async def _record_declined(
        self, uow: PromotionsUnitOfWork, record: TopupRecord, voucher: Voucher | None
    ) -> None:
        """Undo the attempt (idempotency claim and voucher lock included: a retry may try
        again), then keep the declined payment on the ledger and tell the event stream."""
        self._metrics.topups.labels(result="payment_failed").inc()
        await uow.rollback()
        declined = replace(record, status=TopupStatus.FAILED)
        await uow.topups.add(declined)
        await uow.events.payment_processed(
            declined, voucher_code=voucher.code if voucher is not None else None
        )
        await uow.commit()
