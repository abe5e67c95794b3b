"""The payment port: how a top-up's final amount gets charged."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol


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
    approved: bool
    reason: str | None = None
    """Why the payment was declined (logged, never shown to the client)."""


class PaymentGateway(Protocol):
    """Charges a payment; called inside the top-up's transaction, with the voucher locked, so
    a declined payment leaves the voucher unspent."""

    async def charge(self, request: PaymentRequest) -> PaymentResult: ...
