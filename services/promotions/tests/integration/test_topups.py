"""Top-ups through gRPC on real PostgreSQL: discounts and caps, Cake's error messages,
expiry, one spend per voucher under 50 concurrent requests, idempotent retries, and a
declined payment that leaves the voucher spendable."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from cake.events.v1 import payloads_pb2
from cake.payments.v1 import payments_pb2
from cake.promotions.v1 import promotions_pb2
from cake_promotions import bootstrap
from cake_promotions.metrics import PromotionsMetrics
from cake_promotions.service.enrollment import FirstLoginEnrollment
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

PHONE = "+84901234567"
DECLINED_AMOUNT = Decimal("13131.31")
DECLINED_CHARGE = Decimal("9191.92")
"""What the bank is asked for a top-up of DECLINED_AMOUNT with a 30 % voucher."""
NOT_SPENDABLE = "Voucher is expired or already used"
TOPUP_IN_PROGRESS = "A top-up with this Idempotency-Key is still being processed; retry later"


def ts(instant: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(instant)
    return stamp


@pytest.fixture(scope="module")
async def server(start_server: Any, bank_simulator: Any) -> Any:
    # The bank declines exactly one amount, so one server serves every test.
    server = await start_server()
    await bank_simulator.set_faults(
        payments_pb2.FaultRule(fault=payments_pb2.FAULT_DECLINE, amount=str(DECLINED_CHARGE)),
    )
    yield server
    await bank_simulator.set_faults()


@pytest.fixture(scope="module")
async def campaign(server: Any, signer: Any) -> Any:
    now = datetime.now(UTC)
    response = await server.stub.CreateCampaign(
        promotions_pb2.CreateCampaignRequest(
            name="Top-up 30%",
            start_date=ts(now - timedelta(hours=1)),
            end_date=ts(now + timedelta(days=30)),
            max_participants=1000,
            discount_percentage=30,
            min_topup_amount=10000,
            max_discount_amount=20000,
        ),
        metadata=signer.metadata(1, "admin"),
    )
    return response.campaign


@pytest.fixture
def voucher_for(engine: AsyncEngine, campaign: Any) -> Callable[[int], Any]:
    """The voucher a user's first login (auth's event) earns."""
    enrollment = FirstLoginEnrollment(
        bootstrap.unit_of_work_factory(engine), PromotionsMetrics(CollectorRegistry())
    )

    async def issue(user_id: int) -> str:
        outcome = await enrollment.enroll_first_login(
            user_id, datetime.now(UTC), event_id=uuid.uuid4()
        )
        assert outcome is not None and outcome.voucher is not None, outcome
        return outcome.voucher.code

    return issue


def topup_request(amount: float, code: str | None = None) -> promotions_pb2.TopupRequest:
    request = promotions_pb2.TopupRequest(phone_number=PHONE, amount=amount)
    if code is not None:
        request.voucher_code = code
    return request


async def test_topup_without_voucher_charges_the_full_amount(
    server: Any, signer: Any, unique: Callable[[], int], engine: AsyncEngine
) -> None:
    user = unique()
    response = await server.stub.Topup(topup_request(50000), metadata=signer.metadata(user))
    assert response.success
    assert re.fullmatch(r"TXN-\d{13}-[0-9A-Z]{6}", response.transaction_id)
    assert (response.original_amount, response.discount_amount, response.final_amount) == (
        50000,
        0,
        50000,
    )
    assert response.phone_number == PHONE
    assert not response.HasField("voucher_code")
    assert response.message == "Top-up successful!"
    async with engine.connect() as connection:
        rows = (
            await connection.execute(
                sa.text("SELECT status, voucher_id FROM topups WHERE user_id = :u"), {"u": user}
            )
        ).all()
    assert [tuple(row) for row in rows] == [("succeeded", None)]


async def test_voucher_discount_is_spent_once(
    server: Any,
    signer: Any,
    voucher_for: Any,
    unique: Callable[[], int],
    engine: AsyncEngine,
) -> None:
    user = unique()
    code = await voucher_for(user)

    response = await server.stub.Topup(topup_request(50000.5, code), metadata=signer.metadata(user))
    # 50000.50 * 30 % = 15000.15
    assert (response.original_amount, response.discount_amount, response.final_amount) == (
        50000.5,
        15000.15,
        35000.35,
    )
    assert response.voucher_code == code
    assert response.message == "Top-up successful! You saved 15000.15 with your voucher."

    voucher = (
        await server.stub.ValidateVoucher(promotions_pb2.ValidateVoucherRequest(code=code))
    ).voucher
    assert (voucher.status, voucher.is_valid) == ("used", False)
    assert (voucher.used_amount, voucher.discount_amount) == (50000.5, 15000.15)
    # The anonymous check never shows the payment's reference; the owner's list does.
    assert not voucher.HasField("transaction_reference")
    mine = (
        await server.stub.ListMyVouchers(
            promotions_pb2.ListMyVouchersRequest(), metadata=signer.metadata(user)
        )
    ).vouchers
    assert mine[0].transaction_reference == response.transaction_id
    promotion = (
        await server.stub.ListMyPromotions(
            promotions_pb2.ListMyPromotionsRequest(), metadata=signer.metadata(user)
        )
    ).promotions[0]
    assert promotion.status == "voucher_used" and promotion.HasField("voucher_used_at")

    with pytest.raises(grpc.aio.AioRpcError) as again:
        await server.stub.Topup(topup_request(50000, code), metadata=signer.metadata(user))
    assert again.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert again.value.details() == NOT_SPENDABLE

    async with engine.connect() as connection:
        events = (
            await connection.execute(
                sa.text(
                    "SELECT event_type, payload FROM outbox WHERE aggregate_id = :u"
                    " AND event_type IN ('VOUCHER_USED', 'PAYMENT_PROCESSED') ORDER BY id"
                ),
                {"u": str(user)},
            )
        ).all()
    # Pending when recorded, then spent and succeeded when the bank's charge is confirmed.
    assert [row.event_type for row in events] == [
        "PAYMENT_PROCESSED",
        "VOUCHER_USED",
        "PAYMENT_PROCESSED",
    ]
    pending = payloads_pb2.PaymentProcessed.FromString(events[0].payload)
    assert (pending.status, pending.success) == (payloads_pb2.PAYMENT_STATUS_PENDING, False)
    used = payloads_pb2.VoucherUsed.FromString(events[1].payload)
    assert (used.code, used.used_amount, used.discount_amount) == (code, "50000.50", "15000.15")
    payment = payloads_pb2.PaymentProcessed.FromString(events[2].payload)
    assert (payment.final_amount, payment.success) == ("35000.35", True)
    assert payment.status == payloads_pb2.PAYMENT_STATUS_SUCCEEDED
    assert payment.transaction_id == response.transaction_id


async def test_discount_is_capped(
    server: Any, signer: Any, voucher_for: Any, unique: Callable[[], int]
) -> None:
    user = unique()
    code = await voucher_for(user)
    response = await server.stub.Topup(topup_request(100000, code), metadata=signer.metadata(user))
    assert (response.discount_amount, response.final_amount) == (20000, 80000)
    assert response.message == "Top-up successful! You saved 20000 with your voucher."


async def test_cake_error_messages(
    server: Any, signer: Any, voucher_for: Any, unique: Callable[[], int]
) -> None:
    owner, stranger = unique(), unique()
    code = await voucher_for(owner)

    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await server.stub.Topup(
            topup_request(50000, "CAKE-ZZZZ9999"), metadata=signer.metadata(owner)
        )
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND
    assert unknown.value.details() == "Invalid voucher code"

    with pytest.raises(grpc.aio.AioRpcError) as not_owned:
        await server.stub.Topup(topup_request(50000, code), metadata=signer.metadata(stranger))
    assert not_owned.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert not_owned.value.details() == "Voucher does not belong to this user"

    with pytest.raises(grpc.aio.AioRpcError) as too_small:
        await server.stub.Topup(topup_request(9999.99, code), metadata=signer.metadata(owner))
    assert too_small.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert too_small.value.details() == "Minimum top-up amount for this voucher is 10000"

    # None of the rejections spent it.
    response = await server.stub.Topup(topup_request(10000, code), metadata=signer.metadata(owner))
    assert response.discount_amount == 3000
    assert response.message == "Top-up successful! You saved 3000 with your voucher."


async def test_invalid_requests_name_their_field(
    server: Any, signer: Any, violated_fields: Callable[..., list[str]]
) -> None:
    metadata = signer.metadata(77)
    for request, field in [
        (topup_request(10.005), "amount"),
        (topup_request(0), "amount"),
        (promotions_pb2.TopupRequest(phone_number="12", amount=10), "phoneNumber"),
        (topup_request(10, "cake-lower"), "voucherCode"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.stub.Topup(request, metadata=metadata)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert violated_fields(caught.value) == [field]
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await server.stub.Topup(topup_request(10))
    assert anonymous.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_expired_voucher_is_refused_and_stored_expired(
    server: Any,
    signer: Any,
    voucher_for: Any,
    unique: Callable[[], int],
    engine: AsyncEngine,
) -> None:
    user = unique()
    code = await voucher_for(user)
    async with engine.begin() as connection:
        await connection.execute(
            sa.text("UPDATE vouchers SET expires_at = now() - interval '1 second' WHERE code = :c"),
            {"c": code},
        )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.Topup(topup_request(50000, code), metadata=signer.metadata(user))
    assert caught.value.details() == NOT_SPENDABLE
    async with engine.connect() as connection:
        status = await connection.scalar(
            sa.text("SELECT status FROM vouchers WHERE code = :c"), {"c": code}
        )
    assert status == "expired"


async def test_fifty_concurrent_topups_spend_one_voucher_once(
    server: Any,
    signer: Any,
    voucher_for: Any,
    unique: Callable[[], int],
    engine: AsyncEngine,
) -> None:
    user = unique()
    code = await voucher_for(user)
    metadata = signer.metadata(user)

    results = await asyncio.gather(
        *(server.stub.Topup(topup_request(50000, code), metadata=metadata) for _ in range(50)),
        return_exceptions=True,
    )

    successes = [result for result in results if isinstance(result, promotions_pb2.TopupResponse)]
    failures = [result for result in results if isinstance(result, grpc.aio.AioRpcError)]
    assert len(successes) == 1
    assert len(failures) == 49
    assert server.registry.get_sample_value("cake_promotions_vouchers_used_total") >= 1
    assert {(error.code(), error.details()) for error in failures} == {
        (grpc.StatusCode.FAILED_PRECONDITION, NOT_SPENDABLE)
    }
    async with engine.connect() as connection:
        spent = (
            await connection.execute(
                sa.text(
                    "SELECT count(*) FILTER (WHERE t.status = 'succeeded'), max(v.status)"
                    " FROM vouchers v LEFT JOIN topups t ON t.voucher_id = v.id"
                    " WHERE v.code = :c"
                ),
                {"c": code},
            )
        ).one()
    assert tuple(spent) == (1, "used")


async def test_idempotent_retry_returns_the_first_result(
    server: Any,
    signer: Any,
    voucher_for: Any,
    unique: Callable[[], int],
    engine: AsyncEngine,
) -> None:
    user = unique()
    code = await voucher_for(user)
    key = (("idempotency-key", f"retry-{user}"),)
    metadata = signer.metadata(user) + key

    first_call = server.stub.Topup(topup_request(60000, code), metadata=metadata)
    first = await first_call
    retried_call = server.stub.Topup(topup_request(60000, code), metadata=metadata)
    retried = await retried_call
    assert retried == first
    # Only the replay says so, in a response header.
    assert ("idempotent-replayed", "true") not in tuple(await first_call.initial_metadata())
    assert ("idempotent-replayed", "true") in tuple(await retried_call.initial_metadata())

    with pytest.raises(grpc.aio.AioRpcError) as different:
        await server.stub.Topup(topup_request(60001, code), metadata=metadata)
    assert different.value.code() is grpc.StatusCode.ALREADY_EXISTS
    assert "Idempotency-Key" in (different.value.details() or "")

    # Keys belong to a user: another user's same key is a different request.
    other = unique()
    elsewhere = await server.stub.Topup(topup_request(60000), metadata=signer.metadata(other) + key)
    assert elsewhere.transaction_id != first.transaction_id

    async with engine.connect() as connection:
        charged = await connection.scalar(
            sa.text("SELECT count(*) FROM topups WHERE user_id = :u"), {"u": user}
        )
    assert charged == 1


async def test_concurrent_retries_with_one_key_charge_once(
    server: Any, signer: Any, unique: Callable[[], int], engine: AsyncEngine
) -> None:
    user = unique()
    metadata = (*signer.metadata(user), ("idempotency-key", "double-tap"))

    results = await asyncio.gather(
        *(server.stub.Topup(topup_request(25000), metadata=metadata) for _ in range(10)),
        return_exceptions=True,
    )

    # One request runs the top-up; a retry that arrives while it is pending is told so.
    responses = [result for result in results if isinstance(result, promotions_pb2.TopupResponse)]
    busy = [result for result in results if isinstance(result, grpc.aio.AioRpcError)]
    assert len(responses) + len(busy) == 10 and responses
    assert len({response.transaction_id for response in responses}) == 1
    for error in busy:
        assert error.code() is grpc.StatusCode.ABORTED
        assert error.details() == TOPUP_IN_PROGRESS
        assert ("retry-after", "1") in tuple(error.trailing_metadata() or ())
    replayed = await server.stub.Topup(topup_request(25000), metadata=metadata)
    assert replayed.transaction_id == responses[0].transaction_id
    async with engine.connect() as connection:
        charged = await connection.scalar(
            sa.text("SELECT count(*) FROM topups WHERE user_id = :u"), {"u": user}
        )
    assert charged == 1


async def test_declined_payment_leaves_the_voucher_spendable(
    server: Any,
    signer: Any,
    voucher_for: Any,
    unique: Callable[[], int],
    engine: AsyncEngine,
) -> None:
    user = unique()
    code = await voucher_for(user)
    metadata = (*signer.metadata(user), ("idempotency-key", "declined-then-retried"))

    with pytest.raises(grpc.aio.AioRpcError) as declined:
        await server.stub.Topup(topup_request(float(DECLINED_AMOUNT), code), metadata=metadata)
    assert declined.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert declined.value.details() == "Payment processing failed"

    voucher = (
        await server.stub.ValidateVoucher(promotions_pb2.ValidateVoucherRequest(code=code))
    ).voucher
    assert (voucher.status, voucher.is_valid) == ("active", True)

    # A failure is not stored under the key: the retry is a fresh attempt (declined again).
    with pytest.raises(grpc.aio.AioRpcError) as retried:
        await server.stub.Topup(topup_request(float(DECLINED_AMOUNT), code), metadata=metadata)
    assert retried.value.details() == "Payment processing failed"

    other_amount = await server.stub.Topup(
        topup_request(20000, code), metadata=signer.metadata(user)
    )
    assert other_amount.discount_amount == 6000

    async with engine.connect() as connection:
        ledger = (
            await connection.execute(
                sa.text("SELECT status FROM topups WHERE user_id = :u ORDER BY id"), {"u": user}
            )
        ).scalars()
        statuses = list(ledger)
        payments = (
            await connection.execute(
                sa.text(
                    "SELECT payload FROM outbox WHERE aggregate_id = :u"
                    " AND event_type = 'PAYMENT_PROCESSED' ORDER BY id"
                ),
                {"u": str(user)},
            )
        ).scalars()
        outcomes = [payloads_pb2.PaymentProcessed.FromString(p).status for p in payments]
    assert statuses == ["failed", "failed", "succeeded"]
    pending, failed, succeeded = (
        payloads_pb2.PAYMENT_STATUS_PENDING,
        payloads_pb2.PAYMENT_STATUS_FAILED,
        payloads_pb2.PAYMENT_STATUS_SUCCEEDED,
    )
    assert outcomes == [pending, failed, pending, failed, pending, succeeded]
    failures = server.registry.get_sample_value(
        "cake_promotions_topups_total", {"result": "payment_failed"}
    )
    assert failures == 2  # the only declined amount in this module
