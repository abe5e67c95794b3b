"""Money and percentages: exact ``Decimal`` arithmetic in currency units, 2 decimals.

Amounts reach Cake as JSON numbers (``double`` in the protos). Converting through ``str``
keeps what the client wrote (``Decimal(str(0.1)) == Decimal("0.1")``, whereas
``Decimal(0.1)`` is the binary approximation), so "at most 2 decimals" can be checked exactly
and all arithmetic after that is decimal, never binary floating point.
"""

from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal

from cake_common.errors import FieldViolation, InvalidArgument

CENT = Decimal("0.01")
HUNDRED = Decimal(100)
# NUMERIC(14,2) holds up to 12 integer digits.
MAX_AMOUNT = Decimal("999999999999.99")


def _invalid(field: str, description: str) -> InvalidArgument:
    return InvalidArgument("Validation failed", [FieldViolation(field, description)])


def decimal_from_number(value: float, *, field: str, allow_zero: bool = False) -> Decimal:
    """The exact decimal a client's JSON number stands for, quantized to cents.

    Raises ``InvalidArgument`` on ``field`` for non-finite, negative (or zero, unless
    ``allow_zero``) values, more than 2 decimals, or more than NUMERIC(14,2) can hold.
    """
    if not math.isfinite(value):
        raise _invalid(field, "must be a finite number")
    amount = Decimal(str(value))
    if amount < 0 or (amount == 0 and not allow_zero):
        raise _invalid(
            field, "must be greater than 0" if not allow_zero else "must not be negative"
        )
    if amount > MAX_AMOUNT:
        raise _invalid(field, f"must be at most {MAX_AMOUNT}")
    quantized = amount.quantize(CENT)
    if quantized != amount:
        raise _invalid(field, "must have at most 2 decimal places")
    return quantized


def calculate_discount(
    amount: Decimal, percentage: Decimal, max_discount: Decimal | None
) -> Decimal:
    """``amount * percentage / 100``, capped at ``max_discount`` (``None``: no cap), rounded
    half-up to the cent. Exact: Decimal multiplication of two 2-decimal numbers needs at
    most 4 decimals, well inside the default 28-digit context."""
    discount = (amount * percentage / HUNDRED).quantize(CENT, rounding=ROUND_HALF_UP)
    if max_discount is not None and discount > max_discount:
        return max_discount.quantize(CENT)
    return discount


def format_amount(amount: Decimal) -> str:
    """An amount as the Cake System printed numbers in messages: ``50000``, ``50000.5``.

    The Cake clients read money as JSON numbers, so its messages interpolated numbers, which
    JavaScript prints without trailing zeros and without an exponent.
    """
    return format(amount.normalize(), "f")
