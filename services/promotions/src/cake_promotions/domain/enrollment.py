"""First-login enrollment: participations and what a user is told about them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
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
    """A concurrent transaction enrolled the same user in the same campaign first (cannot
    happen while every enrollment reads participations under the campaign row lock; kept as
    the unique constraint's answer, settled by retrying the whole batch)."""


def is_in_first_hundred(participation: Participation, campaign: Campaign) -> bool:
    """The Cake System's ``isInFirstHundred``: the participant holds one of the campaign's
    voucher slots (order at most ``max_participants``, 100 by default)."""
    return participation.participation_order <= campaign.max_participants


class EnrollmentResult(StrEnum):
    ENROLLED = "enrolled"
    ALREADY_PARTICIPATED = "already_participated"
    CAMPAIGN_FULL = "campaign_full"
    NO_CAMPAIGN = "no_campaign"
    NOT_ENROLLED = "not_enrolled"


ENROLLMENT_MESSAGES = {
    EnrollmentResult.ENROLLED: "Congratulations! You have been enrolled and received a voucher",
    EnrollmentResult.ALREADY_PARTICIPATED: "User already participated in this campaign",
    EnrollmentResult.CAMPAIGN_FULL: "Campaign is full",
    EnrollmentResult.NO_CAMPAIGN: "No active campaign available",
    EnrollmentResult.NOT_ENROLLED: (
        "Not enrolled: only a first login while a campaign is active earns its voucher"
    ),
}

#: Why a first-login event enrolled nobody, as recorded with the decision.
DECISION_REASONS = {
    EnrollmentResult.ENROLLED: "enrolled",
    EnrollmentResult.ALREADY_PARTICIPATED: "the user was already enrolled in the campaign",
    EnrollmentResult.CAMPAIGN_FULL: "the campaign running at the login time had no slot left",
    EnrollmentResult.NO_CAMPAIGN: "no first-login campaign was running at the login time",
}
ELIGIBLE_MESSAGE = "User is eligible for this campaign"


@dataclass(frozen=True, slots=True)
class EnrollmentOutcome:
    """What a first login did: ``campaign`` is the campaign considered (none when no campaign
    runs); ``participation``/``voucher`` are the user's, new or earlier."""

    result: EnrollmentResult
    campaign: Campaign | None = None
    participation: Participation | None = None
    voucher: Voucher | None = None

    @property
    def eligible(self) -> bool:
        """True when this call enrolled the user (Cake: ``false`` once enrolled)."""
        return self.result is EnrollmentResult.ENROLLED

    @property
    def message(self) -> str:
        return ENROLLMENT_MESSAGES[self.result]


@dataclass(frozen=True, slots=True)
class Eligibility:
    """Whether a first login now would enroll the user (``GET /promotions/eligibility``)."""

    eligible: bool
    message: str
    campaign: Campaign | None = None


def eligibility_for(campaign: Campaign | None, *, already_participated: bool) -> Eligibility:
    if campaign is None:
        return Eligibility(False, ENROLLMENT_MESSAGES[EnrollmentResult.NO_CAMPAIGN])
    if already_participated:
        return Eligibility(
            False, ENROLLMENT_MESSAGES[EnrollmentResult.ALREADY_PARTICIPATED], campaign
        )
    if campaign.status is CampaignStatus.FULL or campaign.is_full:
        return Eligibility(False, ENROLLMENT_MESSAGES[EnrollmentResult.CAMPAIGN_FULL], campaign)
    return Eligibility(True, ELIGIBLE_MESSAGE, campaign)


@dataclass(frozen=True, slots=True)
class FirstLoginDecision:
    """What a user's USER_FIRST_LOGIN event decided, kept whatever the outcome."""

    user_id: int
    event_id: UUID | None
    login_at: datetime
    decided_at: datetime
    result: EnrollmentResult
    campaign_id: int | None
    reason: str


# -- a batch of first logins ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FirstLogin:
    """One user's first login as auth's USER_FIRST_LOGIN event reports it (``event_id`` is
    ``None`` when it did not come from the consumer)."""

    user_id: int
    login_at: datetime
    event_id: UUID | None = None


@dataclass(frozen=True, slots=True)
class CampaignHistory:
    """A candidate campaign with the admin-set statuses it went through, oldest first (the
    ``campaign_status_changes`` rows a trigger keeps)."""

    campaign: Campaign
    changes: tuple[tuple[datetime, CampaignStatus], ...] = ()

    def status_then(self, instant: datetime) -> CampaignStatus:
        """The status the campaign had at ``instant``: the last change at or before it; before
        the first recorded change, the status it was first given; with no history at all,
        the status it has now."""
        then = None
        for changed_at, status in self.changes:
            if changed_at > instant:
                break
            then = status
        if then is not None:
            return then
        return self.changes[0][1] if self.changes else self.campaign.status


_RUNNING_STATUSES = (CampaignStatus.ACTIVE, CampaignStatus.FULL)


def campaign_at_login(candidates: Sequence[CampaignHistory], login_at: datetime) -> Campaign | None:
    """The campaign a first login at ``login_at`` belongs to: the newest (created last) whose
    window contains the login and whose status at that moment was active or full, whatever
    it is now, so a late event is decided by the login time; ``None`` if none was running."""
    running = [
        candidate.campaign
        for candidate in candidates
        if candidate.campaign.window_contains(login_at)
        and candidate.status_then(login_at) in _RUNNING_STATUSES
    ]
    if not running:
        return None
    return max(running, key=lambda campaign: (campaign.created_at, campaign.id))


@dataclass(frozen=True, slots=True)
class SlotCount:
    """A campaign's slot counter as read under its row lock (or seen full, which it stays)."""

    max_participants: int
    taken: int


@dataclass(frozen=True, slots=True)
class LoginDecision:
    """What one first login of a batch gets. ``participation_order`` is set only for a new
    enrollment."""

    result: EnrollmentResult
    campaign_id: int | None = None
    participation_order: int | None = None


@dataclass(frozen=True, slots=True)
class SlotReservation:
    """The slots a batch takes in one campaign: orders ``before + 1`` .. ``after``."""

    campaign_id: int
    before: int
    after: int

    @property
    def count(self) -> int:
        return self.after - self.before


@dataclass(frozen=True, slots=True)
class BatchPlan:
    decisions: tuple[LoginDecision, ...]
    """One per login, in the order given."""
    reservations: tuple[SlotReservation, ...]
    """One per campaign that gains participants, by campaign id."""


def decide_batch(
    logins: Sequence[FirstLogin],
    campaign_ids: Sequence[int | None],
    slots: Mapping[int, SlotCount],
    enrolled: Set[tuple[int, int]],
) -> BatchPlan:
    """Decide a whole batch of first logins at once, exactly as if they had come one by one
    in login-time order (ties: in the order given).

    ``campaign_ids[i]`` is the campaign running at ``logins[i].login_at`` (``None``: none);
    ``slots`` each such campaign's counter, read under its row lock; ``enrolled`` the
    ``(campaign_id, user_id)`` pairs already enrolled, read under that same lock.

    A user not yet enrolled takes the next free slot (orders continue ``taken + 1``,
    ``taken + 2`` … with no gap or repeat), until ``max_participants``; then "Campaign is
    full". A user already enrolled, or enrolled by an earlier login of the same batch, is
    told so and takes nothing. So exactly ``min(new users, free slots)`` slots are taken.
    """
    if len(campaign_ids) != len(logins):
        raise ValueError("one campaign (or None) per login")
    taken = {campaign_id: count.taken for campaign_id, count in slots.items()}
    seen = set(enrolled)
    decisions: list[LoginDecision | None] = [None] * len(logins)
    in_login_order = sorted(range(len(logins)), key=lambda index: logins[index].login_at)
    for index in in_login_order:
        campaign_id = campaign_ids[index]
        if campaign_id is None:
            decisions[index] = LoginDecision(EnrollmentResult.NO_CAMPAIGN)
            continue
        user_id = logins[index].user_id
        if (campaign_id, user_id) in seen:
            decisions[index] = LoginDecision(EnrollmentResult.ALREADY_PARTICIPATED, campaign_id)
            continue
        count = slots[campaign_id]
        if taken[campaign_id] >= count.max_participants:
            decisions[index] = LoginDecision(EnrollmentResult.CAMPAIGN_FULL, campaign_id)
            continue
        taken[campaign_id] += 1
        seen.add((campaign_id, user_id))
        decisions[index] = LoginDecision(
            EnrollmentResult.ENROLLED, campaign_id, participation_order=taken[campaign_id]
        )
    reservations = tuple(
        SlotReservation(campaign_id, slots[campaign_id].taken, after)
        for campaign_id, after in sorted(taken.items())
        if after > slots[campaign_id].taken
    )
    return BatchPlan(tuple(d for d in decisions if d is not None), reservations)


def first_of_each_event(logins: Sequence[FirstLogin]) -> list[int]:
    """Positions of the logins to apply: a repeat of an event id already in the batch (the
    same message delivered twice) is dropped; logins without an event id are all kept."""
    seen: set[UUID] = set()
    kept = []
    for index, login in enumerate(logins):
        if login.event_id is not None:
            if login.event_id in seen:
                continue
            seen.add(login.event_id)
        kept.append(index)
    return kept
