"""The payment port: how a top-up's final amount gets charged."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from cake_promotions.domain.topups import PaymentOutcome


@dataclass(frozen=True, slots=True)
class PaymentRequest:
    transaction_id: str
    user_id: int
    phone_number: str
    amount: Decimal
    """The amount to charge: the top-up minus its discount."""
    original_amount: Decimal
    payment_method: str


@dataclass(frozen=True, slots=True)
class PaymentResult:
    outcome: PaymentOutcome
    reason: str | None = None
    """Why the payment was declined or its outcome is unknown (logged, never shown to the
    client)."""

    @property
    def approved(self) -> bool:
        return self.outcome is PaymentOutcome.CHARGED


class PaymentGateway(Protocol):
    """The bank. Called outside any database transaction, with the top-up already recorded
    pending; ``transaction_id`` is the bank's idempotency key, so a repeated charge never
    debits twice. Neither method raises for an unreachable bank: that is
    ``PaymentOutcome.UNKNOWN``."""

    async def charge(self, request: PaymentRequest) -> PaymentResult: ...

    async def settle_status(self, transaction_id: str) -> PaymentResult:
        """Whether ``transaction_id`` was charged, as a final answer: an id never charged is
        voided at the bank, so a charge still in flight can no longer go through."""
        ...

    async def close(self) -> None: ...
