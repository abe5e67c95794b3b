"""Voucher rules: codes, validity, expiry and the order of the top-up checks."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from cake_common.errors import FailedPrecondition, NotFound
from cake_promotions.domain.vouchers import (
    VOUCHER_CODE_PATTERN,
    Voucher,
    VoucherStatus,
    check_spendable,
    generate_voucher_code,
    view_voucher,
    voucher_expiry,
)

ISSUED = datetime(2026, 1, 1, tzinfo=UTC)
EXPIRES = ISSUED + timedelta(days=30)


def voucher(
    *, status: VoucherStatus = VoucherStatus.ACTIVE, user_id: int = 7, minimum: str = "50000"
) -> Voucher:
    return Voucher(
        id=1,
        code="CAKE-ABCD1234",
        user_promotion_id=1,
        user_id=user_id,
        type="discount",
        status=status,
        discount_percentage=Decimal("30"),
        min_topup_amount=Decimal(minimum),
        max_discount_amount=None,
        issued_at=ISSUED,
        expires_at=EXPIRES,
        used_at=None,
        used_amount=None,
        discount_amount=None,
        transaction_reference=None,
    )


def test_codes_have_the_cake_format_and_use_the_whole_alphabet() -> None:
    codes = {generate_voucher_code() for _ in range(2000)}
    assert all(VOUCHER_CODE_PATTERN.fullmatch(code) for code in codes)
    assert len(codes) == 2000
    used = set("".join(code[5:] for code in codes))
    assert used == set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


def test_code_generation_takes_its_randomness_from_the_given_source() -> None:
    rng = random.Random(1)
    assert generate_voucher_code(rng.choice) == generate_voucher_code(random.Random(1).choice)


def test_expiry_is_validity_days_after_issue() -> None:
    assert voucher_expiry(ISSUED, 30) == EXPIRES


def test_an_active_voucher_past_expiry_reads_expired() -> None:
    before = view_voucher(voucher(), EXPIRES - timedelta(seconds=1))
    assert (before.status, before.is_valid, before.is_expired) == (
        VoucherStatus.ACTIVE,
        True,
        False,
    )
    after = view_voucher(voucher(), EXPIRES)
    assert (after.status, after.is_valid, after.is_expired) == (VoucherStatus.EXPIRED, False, True)


def test_a_used_voucher_stays_used_after_expiry() -> None:
    after = view_voucher(voucher(status=VoucherStatus.USED), EXPIRES + timedelta(days=1))
    assert (after.status, after.is_valid, after.is_expired) == (VoucherStatus.USED, False, True)


NOW = ISSUED + timedelta(days=1)


def test_spendable_voucher_passes() -> None:
    assert check_spendable(voucher(), user_id=7, amount=Decimal("50000"), now=NOW).id == 1


def test_unknown_voucher_is_not_found() -> None:
    with pytest.raises(NotFound, match=r"^Invalid voucher code$"):
        check_spendable(None, user_id=7, amount=Decimal("1"), now=NOW)


def test_ownership_is_checked_before_state_and_amount() -> None:
    with pytest.raises(FailedPrecondition, match=r"^Voucher does not belong to this user$"):
        check_spendable(
            voucher(user_id=8, status=VoucherStatus.USED), user_id=7, amount=Decimal("1"), now=NOW
        )


@pytest.mark.parametrize(
    ("status", "now"),
    [
        (VoucherStatus.USED, NOW),
        (VoucherStatus.EXPIRED, NOW),
        (VoucherStatus.CANCELLED, NOW),
        (VoucherStatus.ACTIVE, EXPIRES),
    ],
)
def test_unusable_vouchers_are_rejected(status: VoucherStatus, now: datetime) -> None:
    with pytest.raises(FailedPrecondition, match=r"^Voucher is expired or already used$"):
        check_spendable(voucher(status=status), user_id=7, amount=Decimal("60000"), now=now)


def test_minimum_amount_message_prints_the_amount_like_cake() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        check_spendable(voucher(), user_id=7, amount=Decimal("49999.99"), now=NOW)
    assert caught.value.message == "Minimum top-up amount for this voucher is 50000"
    with pytest.raises(FailedPrecondition) as caught:
        check_spendable(voucher(minimum="10.50"), user_id=7, amount=Decimal("10.49"), now=NOW)
    assert caught.value.message == "Minimum top-up amount for this voucher is 10.5"
