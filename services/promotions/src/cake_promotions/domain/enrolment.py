"""First-login enrolment: participations and what a user is told about them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from uuid import UUID

from cake_promotions.domain.campaigns import Campaign, CampaignStatus
from cake_promotions.domain.vouchers import Voucher


class ParticipationStatus(StrEnum):
    ELIGIBLE = "eligible"
    VOUCHER_ISSUED = "voucher_issued"
    VOUCHER_USED = "voucher_used"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Participation:
    """One user's place in one campaign (a ``user_promotions`` row)."""

    id: int
    user_id: int
    campaign_id: int
    participation_order: int
    status: ParticipationStatus
    first_login_at: datetime
    voucher_issued_at: datetime | None
    voucher_used_at: datetime | None
    created_at: datetime


class ParticipationConflict(Exception):  # noqa: N818 - a race outcome, settled by retrying
    """A concurrent transaction enrolled the same user in the same campaign first."""


def is_in_first_hundred(participation: Participation, campaign: Campaign) -> bool:
    """The Cake System's ``isInFirstHundred``: the participant holds one of the campaign's
    voucher slots (order at most ``max_participants``, 100 by default)."""
    return participation.participation_order <= campaign.max_participants


class EnrolmentResult(StrEnum):
    ENROLLED = "enrolled"
    ALREADY_PARTICIPATED = "already_participated"
    CAMPAIGN_FULL = "campaign_full"
    NO_CAMPAIGN = "no_campaign"
    NOT_ENROLLED = "not_enrolled"


ENROLMENT_MESSAGES = {
    EnrolmentResult.ENROLLED: "Congratulations! You have been enrolled and received a voucher",
    EnrolmentResult.ALREADY_PARTICIPATED: "User already participated in this campaign",
    EnrolmentResult.CAMPAIGN_FULL: "Campaign is full",
    EnrolmentResult.NO_CAMPAIGN: "No active campaign available",
    EnrolmentResult.NOT_ENROLLED: (
        "Not enrolled: only a first login while a campaign is active earns its voucher"
    ),
}

#: Why a first-login event enrolled nobody, as recorded with the decision.
DECISION_REASONS = {
    EnrolmentResult.ENROLLED: "enrolled",
    EnrolmentResult.ALREADY_PARTICIPATED: "the user was already enrolled in the campaign",
    EnrolmentResult.CAMPAIGN_FULL: "the campaign running at the login time had no slot left",
    EnrolmentResult.NO_CAMPAIGN: "no first-login campaign was running at the login time",
}
ELIGIBLE_MESSAGE = "User is eligible for this campaign"


@dataclass(frozen=True, slots=True)
class EnrolmentOutcome:
    """What a first login did: ``campaign`` is the campaign considered (none when no campaign
    runs); ``participation``/``voucher`` are the user's, new or earlier."""

    result: EnrolmentResult
    campaign: Campaign | None = None
    participation: Participation | None = None
    voucher: Voucher | None = None

    @property
    def eligible(self) -> bool:
        """True when this call enrolled the user (Cake: ``false`` once enrolled)."""
        return self.result is EnrolmentResult.ENROLLED

    @property
    def message(self) -> str:
        return ENROLMENT_MESSAGES[self.result]


@dataclass(frozen=True, slots=True)
class Eligibility:
    """Whether a first login now would enrol the user (``GET /promotions/eligibility``)."""

    eligible: bool
    message: str
    campaign: Campaign | None = None


def eligibility_for(campaign: Campaign | None, *, already_participated: bool) -> Eligibility:
    if campaign is None:
        return Eligibility(False, ENROLMENT_MESSAGES[EnrolmentResult.NO_CAMPAIGN])
    if already_participated:
        return Eligibility(
            False, ENROLMENT_MESSAGES[EnrolmentResult.ALREADY_PARTICIPATED], campaign
        )
    if campaign.status is CampaignStatus.FULL or campaign.is_full:
        return Eligibility(False, ENROLMENT_MESSAGES[EnrolmentResult.CAMPAIGN_FULL], campaign)
    return Eligibility(True, ELIGIBLE_MESSAGE, campaign)


@dataclass(frozen=True, slots=True)
class FirstLoginDecision:
    """What a user's USER_FIRST_LOGIN event decided, kept whatever the outcome."""

    user_id: int
    event_id: UUID | None
    login_at: datetime
    decided_at: datetime
    result: EnrolmentResult
    campaign_id: int | None
    reason: str
