"""A charge of a top-up's final amount and the bank's answer (port: ``ports.PaymentGateway``)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

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
