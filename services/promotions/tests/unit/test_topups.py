"""Top-up helpers: transaction ids, request fingerprints, stored receipts, the bank simulator."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal

from cake_promotions.adapters.payments import SimulatedBankTransfer
from cake_promotions.adapters.receipts import decode_receipt, encode_receipt
from cake_promotions.domain.payments import PaymentRequest
from cake_promotions.domain.topups import (
    PaymentOutcome,
    TopupCommand,
    TopupReceipt,
    new_transaction_id,
)


def test_transaction_id_format() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    transaction_id = new_transaction_id(now)
    assert re.fullmatch(r"TXN-\d{13}-[0-9A-Z]{6}", transaction_id)
    assert transaction_id.startswith(f"TXN-{int(now.timestamp() * 1000)}-")
    assert len({new_transaction_id(now) for _ in range(1000)}) == 1000


def command(**changes: object) -> TopupCommand:
    values: dict[str, object] = {
        "user_id": 1,
        "phone_number": "+84901234567",
        "amount": Decimal("100000.00"),
        "voucher_code": "CAKE-ABCD1234",
        "payment_method": "bank_transfer",
    }
    values.update(changes)
    return TopupCommand(**values)  # type: ignore[arg-type]


def test_fingerprint_depends_on_every_requested_value() -> None:
    base = command().fingerprint()
    assert command().fingerprint() == base
    assert command(amount=Decimal("100000")).fingerprint() != base  # "100000" vs "100000.00"
    assert command(amount=Decimal("100000.01")).fingerprint() != base
    assert command(phone_number="+84901234568").fingerprint() != base
    assert command(voucher_code=None).fingerprint() != base
    assert command(payment_method="card").fingerprint() != base


def test_receipts_round_trip_exactly() -> None:
    receipt = TopupReceipt(
        success=True,
        transaction_id="TXN-1-ABCDEF",
        original_amount=Decimal("999999999999.99"),
        discount_amount=Decimal("299999999999.99"),
        final_amount=Decimal("700000000000.00"),
        phone_number="+84901234567",
        voucher_code=None,
        message="ok",
    )
    assert decode_receipt(encode_receipt(receipt)) == receipt


async def test_simulated_bank_is_deterministic() -> None:
    request = PaymentRequest("TXN-1", 1, "+8490", Decimal("70"), Decimal("100"), "bank_transfer")
    assert (await SimulatedBankTransfer().charge(request)).outcome is PaymentOutcome.CHARGED
    assert (
        await SimulatedBankTransfer(decline_all=True).charge(request)
    ).outcome is PaymentOutcome.NOT_CHARGED
    declining = SimulatedBankTransfer(decline_amount=Decimal("100.00"))
    assert (await declining.charge(request)).outcome is PaymentOutcome.NOT_CHARGED
    other = PaymentRequest("TXN-2", 1, "+8490", Decimal("70"), Decimal("100.01"), "bank_transfer")
    assert (await declining.charge(other)).outcome is PaymentOutcome.CHARGED
