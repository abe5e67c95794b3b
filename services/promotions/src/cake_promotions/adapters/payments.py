"""Payment adapters."""

from __future__ import annotations

from decimal import Decimal

from cake_common.logging import get_logger

from cake_promotions.domain.payments import PaymentRequest, PaymentResult

_log = get_logger(__name__)


class SimulatedBankTransfer:
    """A deterministic stand-in for the bank: approves every payment unless told otherwise.

    The Cake System failed 5 % of payments at random; Cake never fails by chance, so tests
    and demos switch failures on explicitly: ``decline_all``, or ``decline_amount`` to decline
    only top-ups of exactly that (original) amount.
    """

    def __init__(self, *, decline_all: bool = False, decline_amount: Decimal | None = None) -> None:
        self._decline_all = decline_all
        self._decline_amount = decline_amount

    async def charge(self, request: PaymentRequest) -> PaymentResult:
        if self._decline_all:
            return PaymentResult(approved=False, reason="simulated bank declines every payment")
        if self._decline_amount is not None and request.original_amount == self._decline_amount:
            return PaymentResult(approved=False, reason="simulated bank declines this amount")
        _log.debug(
            "simulated bank transfer approved",
            transaction_id=request.transaction_id,
            amount=str(request.amount),
        )
        return PaymentResult(approved=True)
