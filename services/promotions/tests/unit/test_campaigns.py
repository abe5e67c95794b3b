"""Campaign rules: defaults, window, expiry and status changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from cake_common.errors import FailedPrecondition, InvalidArgument
from cake_promotions.domain.campaigns import (
    Campaign,
    CampaignStatus,
    CampaignTerms,
    new_campaign,
)

START = datetime(2026, 1, 1, tzinfo=UTC)
END = START + timedelta(days=30)


def campaign(
    *, status: CampaignStatus = CampaignStatus.ACTIVE, current: int = 0, maximum: int = 100
) -> Campaign:
    return Campaign(
        id=1,
        name="First login",
        description="",
        type="first_login_discount",
        status=status,
        start_date=START,
        end_date=END,
        max_participants=maximum,
        current_participants=current,
        terms=CampaignTerms(Decimal("30"), Decimal("0"), None, 30),
        created_at=START,
        updated_at=START,
    )


def test_missing_values_get_the_cake_defaults() -> None:
    created = new_campaign(name="n", description="", start_date=START, end_date=END)
    assert created.type == "first_login_discount"
    assert created.max_participants == 100
    assert created.terms == CampaignTerms(Decimal("30.00"), Decimal("0.00"), None, 30)


def test_zero_means_unset_and_a_zero_cap_means_no_cap() -> None:
    created = new_campaign(
        name="n",
        description="",
        start_date=START,
        end_date=END,
        max_participants=0,
        discount_percentage=Decimal("0"),
        max_discount_amount=Decimal("0.00"),
        voucher_validity_days=0,
    )
    assert created.max_participants == 100
    assert created.terms.discount_percentage == Decimal("30.00")
    assert created.terms.max_discount_amount is None
    assert created.terms.voucher_validity_days == 30


def test_given_values_are_kept() -> None:
    created = new_campaign(
        name="n",
        description="d",
        start_date=START,
        end_date=END,
        max_participants=5,
        discount_percentage=Decimal("12.5"),
        min_topup_amount=Decimal("50000"),
        max_discount_amount=Decimal("20000"),
        voucher_validity_days=7,
    )
    assert created.max_participants == 5
    assert created.terms == CampaignTerms(Decimal("12.5"), Decimal("50000"), Decimal("20000"), 7)


@pytest.mark.parametrize("end", [START, START - timedelta(seconds=1)])
def test_window_must_end_after_it_starts(end: datetime) -> None:
    with pytest.raises(InvalidArgument) as caught:
        new_campaign(name="n", description="", start_date=START, end_date=end)
    assert [violation.field for violation in caught.value.violations] == ["end_date"]


def test_window_is_half_open() -> None:
    running = campaign()
    assert running.window_contains(START)
    assert running.window_contains(END - timedelta(microseconds=1))
    assert not running.window_contains(END)
    assert not running.window_contains(START - timedelta(microseconds=1))


@pytest.mark.parametrize(
    "status", [CampaignStatus.ACTIVE, CampaignStatus.INACTIVE, CampaignStatus.FULL]
)
def test_campaigns_past_their_end_read_expired(status: CampaignStatus) -> None:
    assert campaign(status=status).status_at(END) is CampaignStatus.EXPIRED
    assert campaign(status=status).status_at(END - timedelta(seconds=1)) is status


def test_remaining_slots() -> None:
    assert campaign(current=40).remaining_slots == 60
    assert campaign(current=100).remaining_slots == 0


def test_activation_rules() -> None:
    now = START + timedelta(days=1)
    campaign(status=CampaignStatus.INACTIVE).check_status_change(CampaignStatus.ACTIVE, now)
    with pytest.raises(FailedPrecondition, match="Campaign has ended"):
        campaign(status=CampaignStatus.EXPIRED).check_status_change(CampaignStatus.ACTIVE, END)
    with pytest.raises(FailedPrecondition, match="Campaign is full"):
        campaign(current=100).check_status_change(CampaignStatus.ACTIVE, now)
    with pytest.raises(FailedPrecondition, match="free slots"):
        campaign(current=99).check_status_change(CampaignStatus.FULL, now)
    campaign(current=100).check_status_change(CampaignStatus.FULL, now)
    campaign().check_status_change(CampaignStatus.INACTIVE, now)
    campaign().check_status_change(CampaignStatus.EXPIRED, now)
