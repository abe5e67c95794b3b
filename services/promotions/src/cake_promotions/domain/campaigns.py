"""Campaigns: defaults, the enrollment window, and which status changes are allowed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from cake_common.errors import FailedPrecondition, FieldViolation, InvalidArgument

FIRST_LOGIN_DISCOUNT = "first_login_discount"

# The Cake System's defaults for a campaign created without these values.
DEFAULT_MAX_PARTICIPANTS = 100
DEFAULT_DISCOUNT_PERCENTAGE = Decimal("30.00")
DEFAULT_MIN_TOPUP_AMOUNT = Decimal("0.00")
DEFAULT_VOUCHER_VALIDITY_DAYS = 30

CAMPAIGN_NOT_FOUND = "Campaign not found"


class CampaignStatus(StrEnum):
    ACTIVE = "active"
    INACTIVE = "inactive"
    EXPIRED = "expired"
    FULL = "full"


# Statuses a campaign leaves for EXPIRED once its end date has passed.
EXPIRABLE_STATUSES = (CampaignStatus.ACTIVE, CampaignStatus.INACTIVE, CampaignStatus.FULL)


@dataclass(frozen=True, slots=True)
class CampaignTerms:
    """What a campaign's vouchers grant; copied onto each voucher when it is issued, so later
    campaign edits never change a voucher already in a user's hands."""

    discount_percentage: Decimal
    min_topup_amount: Decimal
    max_discount_amount: Decimal | None
    voucher_validity_days: int


@dataclass(frozen=True, slots=True)
class NewCampaign:
    name: str
    description: str
    type: str
    start_date: datetime
    end_date: datetime
    max_participants: int
    terms: CampaignTerms


def new_campaign(
    *,
    name: str,
    description: str,
    start_date: datetime,
    end_date: datetime,
    campaign_type: str | None = None,
    max_participants: int | None = None,
    discount_percentage: Decimal | None = None,
    min_topup_amount: Decimal | None = None,
    max_discount_amount: Decimal | None = None,
    voucher_validity_days: int | None = None,
) -> NewCampaign:
    """A campaign to create, with the Cake System's defaults for every value left out.

    Raises ``InvalidArgument`` (field ``end_date``) unless the window ends after it starts.
    """
    if end_date <= start_date:
        raise InvalidArgument(
            "Validation failed",
            [FieldViolation("end_date", "end_date must be after start_date")],
        )
    return NewCampaign(
        name=name,
        description=description,
        type=campaign_type or FIRST_LOGIN_DISCOUNT,
        start_date=start_date,
        end_date=end_date,
        max_participants=max_participants or DEFAULT_MAX_PARTICIPANTS,
        terms=CampaignTerms(
            discount_percentage=discount_percentage or DEFAULT_DISCOUNT_PERCENTAGE,
            min_topup_amount=min_topup_amount or DEFAULT_MIN_TOPUP_AMOUNT,
            max_discount_amount=max_discount_amount or None,
            voucher_validity_days=voucher_validity_days or DEFAULT_VOUCHER_VALIDITY_DAYS,
        ),
    )


@dataclass(frozen=True, slots=True)
class Campaign:
    id: int
    name: str
    description: str
    type: str
    status: CampaignStatus
    start_date: datetime
    end_date: datetime
    max_participants: int
    current_participants: int
    terms: CampaignTerms
    created_at: datetime
    updated_at: datetime

    @property
    def remaining_slots(self) -> int:
        return max(self.max_participants - self.current_participants, 0)

    @property
    def is_full(self) -> bool:
        return self.current_participants >= self.max_participants

    def has_ended(self, now: datetime) -> bool:
        return self.end_date <= now

    def window_contains(self, instant: datetime) -> bool:
        """The enrollment window is half-open: ``[start_date, end_date)``."""
        return self.start_date <= instant < self.end_date

    def status_at(self, now: datetime) -> CampaignStatus:
        """The status as it must read at ``now``: past its end a campaign is expired."""
        if self.status in EXPIRABLE_STATUSES and self.has_ended(now):
            return CampaignStatus.EXPIRED
        return self.status

    def check_status_change(self, target: CampaignStatus, now: datetime) -> None:
        """Raise ``FailedPrecondition`` if an admin may not move the campaign to ``target``.

        ``full`` and ``expired`` describe facts (slots taken, window over), so a campaign can
        only be activated while neither holds, and only marked full once it is; ending a
        campaign early (``expired``) and pausing it (``inactive``) are always allowed.
        """
        if target is CampaignStatus.ACTIVE:
            if self.has_ended(now):
                raise FailedPrecondition("Campaign has ended", reason="CAMPAIGN_ENDED")
            if self.is_full:
                raise FailedPrecondition("Campaign is full", reason="CAMPAIGN_FULL")
        elif target is CampaignStatus.FULL and not self.is_full:
            raise FailedPrecondition("Campaign still has free slots", reason="CAMPAIGN_NOT_FULL")
