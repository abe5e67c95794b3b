"""Top-ups: the command, its receipt, transaction ids, idempotency fingerprints, and the
states of the top-up saga.

A top-up is a saga of three steps, so no database transaction is ever open while the bank
is called:

1. **reserve** (one short transaction): the voucher becomes ``reserved`` until an expiry and
   the top-up is recorded ``pending`` (with its Idempotency-Key). The record exists before
   any money moves, so there is never a charge without one.
2. **charge** (no transaction): the bank is asked to debit the final amount, with the
   top-up's transaction id as the bank's idempotency key, so no retry charges twice.
3. **confirm** (charged: top-up ``succeeded``, voucher ``used``) or **compensate** (not
   charged: top-up ``failed``, voucher ``active`` again), one short transaction each.

When the bank's answer is unknown (deadline, crash, outage) the top-up stays ``pending`` and
the reconciler settles it once it is overdue, by asking the bank (which voids the id if it
was never charged, so the answer is final).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from cake_promotions.domain.money import format_amount

DEFAULT_PAYMENT_METHOD = "bank_transfer"
TOPUP_SUCCEEDED_MESSAGE = "Top-up successful!"
TOPUP_SAVED_MESSAGE = "Top-up successful! You saved {discount} with your voucher."
PAYMENT_FAILED_MESSAGE = "Payment processing failed"
PAYMENT_PENDING_MESSAGE = (
    "Payment is still being processed; retry with the same Idempotency-Key for the result"
)
TOPUP_IN_PROGRESS_MESSAGE = (
    "A top-up with this Idempotency-Key is still being processed; retry later"
)
IDEMPOTENCY_KEY_REUSED_MESSAGE = (
    "Idempotency-Key has already been used for a different top-up request"
)
MAX_IDEMPOTENCY_KEY_LENGTH = 255

_BASE36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class TopupStatus(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class PaymentOutcome(StrEnum):
    """What the bank said about a top-up's charge."""

    CHARGED = "charged"
    NOT_CHARGED = "not_charged"
    """Declined, or voided before any charge: final, the money did not move."""
    UNKNOWN = "unknown"
    """No answer (deadline, crash, outage): it may or may not have been charged."""


class SagaStep(StrEnum):
    CONFIRM = "confirm"
    COMPENSATE = "compensate"
    WAIT = "wait"
    """Stay pending: nothing is known yet."""
    NOTHING = "nothing"
    """Already settled the same way (a concurrent request or the reconciler did it)."""


class SagaInvariantBroken(Exception):  # noqa: N818 - names the broken rule, like CakeError
    """The bank charged a top-up that was already settled as failed (or the reverse)."""


def next_step(status: TopupStatus, outcome: PaymentOutcome) -> SagaStep:
    """The saga's transition for a top-up in ``status`` once the bank said ``outcome``."""
    if outcome is PaymentOutcome.UNKNOWN:
        return SagaStep.WAIT if status is TopupStatus.PENDING else SagaStep.NOTHING
    settled = TopupStatus.SUCCEEDED if outcome is PaymentOutcome.CHARGED else TopupStatus.FAILED
    if status is TopupStatus.PENDING:
        return SagaStep.CONFIRM if outcome is PaymentOutcome.CHARGED else SagaStep.COMPENSATE
    if status is settled:
        return SagaStep.NOTHING
    raise SagaInvariantBroken(f"top-up {status.value} but the bank says {outcome.value}")


def success_message(discount: Decimal) -> str:
    """Cake's success message: with a discount it says how much was saved, the amount
    printed as Cake prints numbers (``30``, ``15000.15``)."""
    if discount > 0:
        return TOPUP_SAVED_MESSAGE.format(discount=format_amount(discount))
    return TOPUP_SUCCEEDED_MESSAGE


@dataclass(frozen=True, slots=True)
class TopupCommand:
    user_id: int
    phone_number: str
    amount: Decimal
    voucher_code: str | None
    payment_method: str

    def fingerprint(self) -> str:
        """A digest of what the request asks for; a retry under the same Idempotency-Key must
        match it (the user is part of the key itself)."""
        canonical = json.dumps(
            [self.phone_number, str(self.amount), self.voucher_code, self.payment_method],
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class TopupReceipt:
    """The answer to a top-up, stored as-is for retries with the same Idempotency-Key."""

    success: bool
    transaction_id: str
    original_amount: Decimal
    discount_amount: Decimal
    final_amount: Decimal
    phone_number: str
    voucher_code: str | None
    message: str
    replayed: bool = False
    """This is the stored answer to an earlier request with the same Idempotency-Key (not
    part of the answer's body; the API says it in the ``Idempotent-Replayed`` header)."""


@dataclass(frozen=True, slots=True)
class TopupRecord:
    """A row of the top-up ledger: pending, succeeded or failed."""

    transaction_id: str
    user_id: int
    phone_number: str
    original_amount: Decimal
    discount_amount: Decimal
    final_amount: Decimal
    voucher_id: int | None
    payment_method: str
    status: TopupStatus
    created_at: datetime
    voucher_code: str | None = None
    idempotency_key: str | None = None
    """The client's Idempotency-Key of the request that started it (answered when it
    settles)."""

    def receipt(self) -> TopupReceipt:
        """The answer to the request once the top-up succeeded."""
        return TopupReceipt(
            success=True,
            transaction_id=self.transaction_id,
            original_amount=self.original_amount,
            discount_amount=self.discount_amount,
            final_amount=self.final_amount,
            phone_number=self.phone_number,
            voucher_code=self.voucher_code,
            message=success_message(self.discount_amount),
        )


def new_transaction_id(now: datetime, choice: Callable[[str], str] = secrets.choice) -> str:
    """``TXN-<epoch ms>-<6 base36 characters>``, the Cake System's format."""
    millis = int(now.timestamp() * 1000)
    suffix = "".join(choice(_BASE36) for _ in range(6))
    return f"TXN-{millis}-{suffix}"
