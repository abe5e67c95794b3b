"""Money rules: exact decimals from JSON numbers, and the discount against an exact model."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import pytest
from cake_common.errors import InvalidArgument
from cake_promotions.domain.money import calculate_discount, decimal_from_number, format_amount
from hypothesis import given
from hypothesis import strategies as st

cents = st.integers(min_value=1, max_value=99_999_999_999_999)  # up to 999,999,999,999.99
percent_hundredths = st.integers(min_value=1, max_value=10_000)  # 0.01 % .. 100.00 %
caps = st.one_of(st.none(), st.integers(min_value=0, max_value=99_999_999_999_999))


def exact_discount(amount: Fraction, percentage: Fraction, cap: Fraction | None) -> Fraction:
    """The model: exact rational arithmetic, cap, then round half up to whole cents."""
    raw = amount * percentage / 100
    if cap is not None and raw > cap:
        raw = cap
    return Fraction(math.floor(raw * 100 + Fraction(1, 2)), 100)


@given(amount=cents, percentage=percent_hundredths, cap=caps)
def test_discount_matches_exact_model(amount: int, percentage: int, cap: int | None) -> None:
    amount_d = Decimal(amount) / 100
    percentage_d = Decimal(percentage) / 100
    cap_d = Decimal(cap) / 100 if cap is not None else None

    discount = calculate_discount(amount_d, percentage_d, cap_d)

    expected = exact_discount(
        Fraction(amount, 100),
        Fraction(percentage, 100),
        Fraction(cap, 100) if cap is not None else None,
    )
    assert Fraction(discount) == expected
    assert discount.as_tuple().exponent == -2
    assert Decimal(0) <= discount <= amount_d
    if cap_d is not None:
        assert discount <= cap_d


@given(amount=cents)
def test_amounts_survive_the_double_round_trip(amount: int) -> None:
    # What a client sends as a JSON number arrives as a double; str() recovers the decimal.
    exact = Decimal(amount) / 100
    assert decimal_from_number(float(exact), field="amount") == exact


def test_half_cent_rounds_up() -> None:
    # 0.05 * 30 % = 0.015 -> 0.02 (half up), where banker's rounding would give 0.02 too;
    # 0.25 * 10 % = 0.025 -> 0.03 (half up), banker's would give 0.02.
    assert calculate_discount(Decimal("0.25"), Decimal("10"), None) == Decimal("0.03")
    assert calculate_discount(Decimal("100000"), Decimal("30"), Decimal("20000")) == Decimal(
        "20000.00"
    )
    assert calculate_discount(Decimal("50000"), Decimal("30"), None) == Decimal("15000.00")


@pytest.mark.parametrize("value", [10.123, 0.001, 1e-9])
def test_more_than_two_decimals_is_rejected(value: float) -> None:
    with pytest.raises(InvalidArgument) as caught:
        decimal_from_number(value, field="amount")
    assert caught.value.violations[0].field == "amount"
    assert "2 decimal places" in caught.value.violations[0].description


@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, math.nan, 1e13])
def test_non_positive_or_huge_amounts_are_rejected(value: float) -> None:
    with pytest.raises(InvalidArgument) as caught:
        decimal_from_number(value, field="amount")
    assert caught.value.violations[0].field == "amount"


def test_zero_is_accepted_where_allowed() -> None:
    assert decimal_from_number(0.0, field="min_topup_amount", allow_zero=True) == Decimal("0.00")


@pytest.mark.parametrize(
    ("amount", "text"),
    [("50000.00", "50000"), ("50000.50", "50000.5"), ("0.05", "0.05"), ("0.00", "0")],
)
def test_amounts_print_like_javascript_numbers(amount: str, text: str) -> None:
    assert format_amount(Decimal(amount)) == text
