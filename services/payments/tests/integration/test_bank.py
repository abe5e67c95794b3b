"""The bank simulator as a real process on real PostgreSQL: idempotent charges, the void
that makes a status answer final, and every fault it acts out."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from cake.payments.v1 import payments_pb2, payments_pb2_grpc

pytestmark = pytest.mark.integration


@pytest.fixture
async def bank(bank_simulator: Any) -> AsyncIterator[payments_pb2_grpc.PaymentsServiceStub]:
    bank_simulator.start()
    async with grpc.aio.insecure_channel(bank_simulator.address) as channel:
        stub = payments_pb2_grpc.PaymentsServiceStub(channel)
        await stub.SetFaults(payments_pb2.SetFaultsRequest())
        yield stub
        await stub.SetFaults(payments_pb2.SetFaultsRequest())


def charge(amount: str = "100.00", txn: str | None = None) -> payments_pb2.ChargeRequest:
    return payments_pb2.ChargeRequest(
        transaction_id=txn or f"TXN-{uuid.uuid4().hex[:12]}",
        user_id=7,
        amount=amount,
        payment_method="bank_transfer",
        phone_number="+84901234567",
    )


async def test_a_retry_never_charges_twice(bank: Any) -> None:
    request = charge()
    before = await bank.GetLedgerStats(payments_pb2.GetLedgerStatsRequest())
    first = await bank.Charge(request)
    again = await bank.Charge(request)
    assert (first.status, first.replayed) == (payments_pb2.CHARGE_STATUS_CHARGED, False)
    assert (again.status, again.replayed) == (payments_pb2.CHARGE_STATUS_CHARGED, True)
    after = await bank.GetLedgerStats(payments_pb2.GetLedgerStatsRequest())
    assert after.charged == before.charged + 1
    found = await bank.GetCharge(
        payments_pb2.GetChargeRequest(transaction_id=request.transaction_id)
    )
    assert (found.status, found.amount) == (payments_pb2.CHARGE_STATUS_CHARGED, "100.00")


async def test_status_query_voids_an_unknown_id_for_good(bank: Any) -> None:
    request = charge()
    unknown = await bank.GetCharge(
        payments_pb2.GetChargeRequest(transaction_id=request.transaction_id)
    )
    assert unknown.status == payments_pb2.CHARGE_STATUS_UNSPECIFIED
    voided = await bank.GetCharge(
        payments_pb2.GetChargeRequest(transaction_id=request.transaction_id, void_if_absent=True)
    )
    assert voided.status == payments_pb2.CHARGE_STATUS_VOIDED
    late = await bank.Charge(request)
    assert (late.status, late.replayed) == (payments_pb2.CHARGE_STATUS_VOIDED, True)


async def test_run_wide_decline_only_for_its_amount(bank: Any) -> None:
    await bank.SetFaults(
        payments_pb2.SetFaultsRequest(
            rules=[payments_pb2.FaultRule(fault=payments_pb2.FAULT_DECLINE, amount="13.13")]
        )
    )
    declined = await bank.Charge(charge("13.13"))
    assert declined.status == payments_pb2.CHARGE_STATUS_DECLINED and declined.reason
    assert (await bank.Charge(charge("13.14"))).status == payments_pb2.CHARGE_STATUS_CHARGED


async def test_per_request_error_and_delay(bank: Any) -> None:
    request = charge()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await bank.Charge(request, metadata=(("x-bank-fault", "error"),))
    assert error.value.code() is grpc.StatusCode.UNAVAILABLE
    began = time.monotonic()
    delayed = await bank.Charge(request, metadata=(("x-bank-fault", "delay=300"),))
    assert time.monotonic() - began >= 0.3
    assert (delayed.status, delayed.replayed) == (payments_pb2.CHARGE_STATUS_CHARGED, False)
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await bank.Charge(charge(), metadata=(("x-bank-fault", "explode"),))
    assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_hang_charges_nothing(bank: Any) -> None:
    request = charge()
    with pytest.raises(grpc.aio.AioRpcError) as hung:
        await bank.Charge(request, metadata=(("x-bank-fault", "hang"),), timeout=0.5)
    assert hung.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    found = await bank.GetCharge(
        payments_pb2.GetChargeRequest(transaction_id=request.transaction_id, void_if_absent=True)
    )
    assert found.status == payments_pb2.CHARGE_STATUS_VOIDED


async def test_crash_after_charge_keeps_the_charge(bank_simulator: Any, bank: Any) -> None:
    request = charge()
    with pytest.raises(grpc.aio.AioRpcError) as crashed:
        await bank.Charge(request, metadata=(("x-bank-fault", "crash_after_charge"),), timeout=5)
    assert crashed.value.code() is grpc.StatusCode.UNAVAILABLE
    assert bank_simulator.wait_exit() != 0
    bank_simulator.start()
    async with grpc.aio.insecure_channel(bank_simulator.address) as channel:
        restarted = payments_pb2_grpc.PaymentsServiceStub(channel)
        found = await restarted.GetCharge(
            payments_pb2.GetChargeRequest(
                transaction_id=request.transaction_id, void_if_absent=True
            )
        )
        assert found.status == payments_pb2.CHARGE_STATUS_CHARGED
        retried = await restarted.Charge(request)
        assert (retried.status, retried.replayed) == (payments_pb2.CHARGE_STATUS_CHARGED, True)


async def test_bad_requests_are_invalid_argument(bank: Any) -> None:
    for request in (charge("1.234"), charge("-1"), payments_pb2.ChargeRequest()):
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await bank.Charge(request)
        assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
