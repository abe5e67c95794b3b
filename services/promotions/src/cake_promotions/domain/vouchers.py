"""Vouchers: codes, validity, expiry and the rules for spending one on a top-up."""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum

from cake_common.errors import FailedPrecondition, NotFound

from cake_promotions.domain.campaigns import CampaignTerms
from cake_promotions.domain.money import format_amount

DISCOUNT_VOUCHER = "discount"
VOUCHER_CODE_PREFIX = "CAKE-"
VOUCHER_CODE_ALPHABET = string.ascii_uppercase + string.digits
VOUCHER_CODE_LENGTH = 8
VOUCHER_CODE_PATTERN = re.compile(r"^CAKE-[A-Z0-9]{8}$")

VOUCHER_NOT_FOUND = "Voucher not found"
INVALID_VOUCHER_CODE = "Invalid voucher code"
VOUCHER_NOT_OWNED = "Voucher does not belong to this user"
VOUCHER_NOT_SPENDABLE = "Voucher is expired or already used"
BELOW_MINIMUM_TOPUP = "Minimum top-up amount for this voucher is {minimum}"


class VoucherStatus(StrEnum):
    ACTIVE = "active"
    RESERVED = "reserved"
    """Held by a pending top-up until ``reserved_until``: used if it is charged, active
    again if not."""
    USED = "used"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


def generate_voucher_code(choice: Callable[[str], str] = secrets.choice) -> str:
    """``CAKE-`` + 8 characters of ``[A-Z0-9]`` from a CSPRNG (36^8 ≈ 2.8e12 codes: guessing
    one is hopeless, and the rare collision is retried by the caller)."""
    return VOUCHER_CODE_PREFIX + "".join(
        choice(VOUCHER_CODE_ALPHABET) for _ in range(VOUCHER_CODE_LENGTH)
    )


def voucher_expiry(issued_at: datetime, validity_days: int) -> datetime:
    return issued_at + timedelta(days=validity_days)


@dataclass(frozen=True, slots=True)
class NewVoucher:
    code: str
    user_promotion_id: int
    user_id: int
    terms: CampaignTerms
    issued_at: datetime
    expires_at: datetime


def new_voucher(
    *, code: str, user_promotion_id: int, user_id: int, terms: CampaignTerms, issued_at: datetime
) -> NewVoucher:
    return NewVoucher(
        code=code,
        user_promotion_id=user_promotion_id,
        user_id=user_id,
        terms=terms,
        issued_at=issued_at,
        expires_at=voucher_expiry(issued_at, terms.voucher_validity_days),
    )


@dataclass(frozen=True, slots=True)
class Voucher:
    id: int
    code: str
    user_promotion_id: int
    user_id: int
    type: str
    status: VoucherStatus
    discount_percentage: Decimal
    min_topup_amount: Decimal
    max_discount_amount: Decimal | None
    issued_at: datetime
    expires_at: datetime
    used_at: datetime | None
    used_amount: Decimal | None
    discount_amount: Decimal | None
    transaction_reference: str | None
    reserved_until: datetime | None = None

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at <= now

    def is_valid(self, now: datetime) -> bool:
        """Spendable now: active and not past its expiry."""
        return self.status is VoucherStatus.ACTIVE and not self.is_expired(now)

    def status_at(self, now: datetime) -> VoucherStatus:
        """The status as it must read at ``now``: an active voucher past expiry is expired."""
        if self.status is VoucherStatus.ACTIVE and self.is_expired(now):
            return VoucherStatus.EXPIRED
        return self.status


@dataclass(frozen=True, slots=True)
class VoucherView:
    """A voucher as shown to clients at one instant (``isValid``/``isExpired`` computed)."""

    voucher: Voucher
    status: VoucherStatus
    is_valid: bool
    is_expired: bool


def view_voucher(voucher: Voucher, now: datetime) -> VoucherView:
    return VoucherView(
        voucher=voucher,
        status=voucher.status_at(now),
        is_valid=voucher.is_valid(now),
        is_expired=voucher.is_expired(now),
    )


def check_spendable(
    voucher: Voucher | None, *, user_id: int, amount: Decimal, now: datetime
) -> Voucher:
    """The voucher if ``user_id`` may spend it on a top-up of ``amount`` now; otherwise the
    Cake System's error, checked in its order: exists, owner, usable, minimum amount."""
    if voucher is None:
        raise NotFound(INVALID_VOUCHER_CODE, reason="VOUCHER_NOT_FOUND")
    if voucher.user_id != user_id:
        raise FailedPrecondition(VOUCHER_NOT_OWNED, reason="VOUCHER_NOT_OWNED")
    if not voucher.is_valid(now):
        raise FailedPrecondition(VOUCHER_NOT_SPENDABLE, reason="VOUCHER_NOT_SPENDABLE")
    if amount < voucher.min_topup_amount:
        raise FailedPrecondition(
            BELOW_MINIMUM_TOPUP.format(minimum=format_amount(voucher.min_topup_amount)),
            reason="BELOW_MINIMUM_TOPUP",
            metadata={"minTopupAmount": format_amount(voucher.min_topup_amount)},
        )
    return voucher
