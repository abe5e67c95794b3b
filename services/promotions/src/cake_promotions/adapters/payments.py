"""Payment adapters: the bank over gRPC (with a deadline), and an in-process stand-in."""

from __future__ import annotations

from decimal import Decimal

import grpc
from cake.payments.v1 import payments_pb2, payments_pb2_grpc
from cake_common.logging import get_logger

from cake_promotions.domain.payments import PaymentRequest, PaymentResult
from cake_promotions.domain.topups import PaymentOutcome

_log = get_logger(__name__)

_OUTCOMES = {
    payments_pb2.CHARGE_STATUS_CHARGED: PaymentOutcome.CHARGED,
    payments_pb2.CHARGE_STATUS_DECLINED: PaymentOutcome.NOT_CHARGED,
    payments_pb2.CHARGE_STATUS_VOIDED: PaymentOutcome.NOT_CHARGED,
}


class GrpcBank:
    """``cake.payments.v1.PaymentsService`` at ``target``; every call has ``deadline_seconds``.

    Any failure to get an answer (deadline, connection refused or reset, an error status) is
    ``UNKNOWN``: the bank may have charged before failing, so only the bank's own answer
    ever settles a top-up.
    """

    def __init__(self, target: str, *, deadline_seconds: float) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = payments_pb2_grpc.PaymentsServiceStub(self._channel)
        self._deadline = deadline_seconds

    async def charge(self, request: PaymentRequest) -> PaymentResult:
        try:
            response = await self._stub.Charge(
                payments_pb2.ChargeRequest(
                    transaction_id=request.transaction_id,
                    user_id=request.user_id,
                    amount=f"{request.amount:.2f}",
                    payment_method=request.payment_method,
                    phone_number=request.phone_number,
                ),
                timeout=self._deadline,
            )
        except grpc.aio.AioRpcError as error:
            return self._unknown("charge", request.transaction_id, error)
        outcome = _OUTCOMES.get(response.status, PaymentOutcome.UNKNOWN)
        return PaymentResult(outcome, reason=response.reason or None)

    async def settle_status(self, transaction_id: str) -> PaymentResult:
        try:
            response = await self._stub.GetCharge(
                payments_pb2.GetChargeRequest(transaction_id=transaction_id, void_if_absent=True),
                timeout=self._deadline,
            )
        except grpc.aio.AioRpcError as error:
            return self._unknown("status query", transaction_id, error)
        return PaymentResult(_OUTCOMES.get(response.status, PaymentOutcome.UNKNOWN))

    @staticmethod
    def _unknown(call: str, transaction_id: str, error: grpc.aio.AioRpcError) -> PaymentResult:
        reason = f"{error.code().name}: {error.details()}"
        _log.warning("bank did not answer", call=call, transaction_id=transaction_id, error=reason)
        return PaymentResult(PaymentOutcome.UNKNOWN, reason=reason)

    async def close(self) -> None:
        await self._channel.close(grace=None)


class SimulatedBankTransfer:
    """An in-process stand-in for the bank (no ``payments_target`` configured): approves
    every payment unless told otherwise, remembers its charges for the process's life.

    ``decline_all``, or ``decline_amount`` to decline only top-ups of exactly that (original)
    amount. Cake never fails a payment by chance.
    """

    def __init__(self, *, decline_all: bool = False, decline_amount: Decimal | None = None) -> None:
        self._decline_all = decline_all
        self._decline_amount = decline_amount
        self._outcomes: dict[str, PaymentOutcome] = {}

    async def charge(self, request: PaymentRequest) -> PaymentResult:
        known = self._outcomes.get(request.transaction_id)
        if known is not None:
            return PaymentResult(known)
        declined = self._decline_all or (
            self._decline_amount is not None and request.original_amount == self._decline_amount
        )
        outcome = PaymentOutcome.NOT_CHARGED if declined else PaymentOutcome.CHARGED
        self._outcomes[request.transaction_id] = outcome
        return PaymentResult(outcome, "simulated bank declines" if declined else None)

    async def settle_status(self, transaction_id: str) -> PaymentResult:
        return PaymentResult(self._outcomes.setdefault(transaction_id, PaymentOutcome.NOT_CHARGED))

    async def close(self) -> None:
        return None
