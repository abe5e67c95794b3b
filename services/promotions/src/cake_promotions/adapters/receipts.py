"""Top-up receipts as ``TopupResponse`` bytes: the wire answer is what a retry with the same
Idempotency-Key gets back, so it is stored in exactly that form."""

from __future__ import annotations

from decimal import Decimal

from cake.promotions.v1 import promotions_pb2

from cake_promotions.domain.money import CENT
from cake_promotions.domain.topups import TopupReceipt


def receipt_to_proto(receipt: TopupReceipt) -> promotions_pb2.TopupResponse:
    response = promotions_pb2.TopupResponse(
        success=receipt.success,
        transaction_id=receipt.transaction_id,
        original_amount=float(receipt.original_amount),
        discount_amount=float(receipt.discount_amount),
        final_amount=float(receipt.final_amount),
        phone_number=receipt.phone_number,
        message=receipt.message,
    )
    if receipt.voucher_code is not None:
        response.voucher_code = receipt.voucher_code
    return response


def encode_receipt(receipt: TopupReceipt) -> bytes:
    return receipt_to_proto(receipt).SerializeToString(deterministic=True)


def decode_receipt(data: bytes) -> TopupReceipt:
    response = promotions_pb2.TopupResponse.FromString(data)

    def money(value: float) -> Decimal:
        return Decimal(str(value)).quantize(CENT)

    return TopupReceipt(
        success=response.success,
        transaction_id=response.transaction_id,
        original_amount=money(response.original_amount),
        discount_amount=money(response.discount_amount),
        final_amount=money(response.final_amount),
        phone_number=response.phone_number,
        voucher_code=response.voucher_code if response.HasField("voucher_code") else None,
        message=response.message,
    )
