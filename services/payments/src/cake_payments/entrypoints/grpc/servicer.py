"""``cake.payments.v1.PaymentsService``: requests → the bank's use cases → responses."""

from __future__ import annotations

from decimal import Decimal

from cake.payments.v1 import payments_pb2, payments_pb2_grpc
from cake_common.errors import FieldViolation, InvalidArgument
from cake_common.grpc_server import ServicerContext
from cake_common.grpc_server.call_scope import metadata_value
from google.protobuf.timestamp_pb2 import Timestamp

from cake_payments.domain.ledger import (
    ChargeOrder,
    ChargeStatus,
    Fault,
    FaultRule,
    LedgerEntry,
    parse_fault,
)
from cake_payments.service.charges import Bank, FaultSwitch

SERVICE_NAME = payments_pb2.DESCRIPTOR.services_by_name["PaymentsService"].full_name
FAULT_HEADER = "x-bank-fault"
"""Request header that makes this one charge act out a fault (``hang``, ``delay=2000``…)."""

_STATUS = {
    ChargeStatus.CHARGED: payments_pb2.CHARGE_STATUS_CHARGED,
    ChargeStatus.DECLINED: payments_pb2.CHARGE_STATUS_DECLINED,
    ChargeStatus.VOIDED: payments_pb2.CHARGE_STATUS_VOIDED,
}
_FAULTS = {
    payments_pb2.FAULT_DECLINE: Fault.DECLINE,
    payments_pb2.FAULT_ERROR: Fault.ERROR,
    payments_pb2.FAULT_DELAY: Fault.DELAY,
    payments_pb2.FAULT_HANG: Fault.HANG,
    payments_pb2.FAULT_CRASH_AFTER_CHARGE: Fault.CRASH_AFTER_CHARGE,
}


def _request_fault(context: ServicerContext) -> FaultRule | None:
    header = metadata_value(context, FAULT_HEADER)
    if header is None:
        return None
    try:
        return parse_fault(header)
    except ValueError:
        raise InvalidArgument(
            "Validation failed",
            [
                FieldViolation(
                    FAULT_HEADER, "must be decline, error, hang, crash_after_charge or delay=<ms>"
                )
            ],
        ) from None


def _timestamp(entry: LedgerEntry) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(entry.recorded_at)
    return stamp


class PaymentsServicer(payments_pb2_grpc.PaymentsServiceServicer):
    def __init__(self, bank: Bank, faults: FaultSwitch) -> None:
        self._bank = bank
        self._faults = faults

    async def Charge(
        self, request: payments_pb2.ChargeRequest, context: ServicerContext
    ) -> payments_pb2.ChargeResponse:
        order = ChargeOrder(
            transaction_id=request.transaction_id,
            user_id=request.user_id,
            amount=Decimal(request.amount),
            payment_method=request.payment_method,
            phone_number=request.phone_number,
        )
        outcome = await self._bank.charge(order, _request_fault(context))
        return payments_pb2.ChargeResponse(
            status=_STATUS[outcome.entry.status],
            reason=outcome.entry.reason or "",
            replayed=outcome.replayed,
        )

    async def GetCharge(
        self, request: payments_pb2.GetChargeRequest, context: ServicerContext
    ) -> payments_pb2.GetChargeResponse:
        entry = await self._bank.get_charge(
            request.transaction_id, void_if_absent=request.void_if_absent
        )
        if entry is None:
            return payments_pb2.GetChargeResponse()
        return payments_pb2.GetChargeResponse(
            status=_STATUS[entry.status],
            amount=f"{entry.amount:.2f}" if entry.amount is not None else "",
            recorded_at=_timestamp(entry),
        )

    async def SetFaults(
        self, request: payments_pb2.SetFaultsRequest, context: ServicerContext
    ) -> payments_pb2.SetFaultsResponse:
        self._faults.replace(
            [
                FaultRule(
                    _FAULTS[rule.fault],
                    delay_ms=rule.delay_ms,
                    amount=Decimal(rule.amount) if rule.amount else None,
                )
                for rule in request.rules
                if rule.fault in _FAULTS
            ]
        )
        return payments_pb2.SetFaultsResponse()

    async def GetLedgerStats(
        self, request: payments_pb2.GetLedgerStatsRequest, context: ServicerContext
    ) -> payments_pb2.GetLedgerStatsResponse:
        stats = await self._bank.stats()
        return payments_pb2.GetLedgerStatsResponse(
            charged=stats.charged, declined=stats.declined, voided=stats.voided
        )
