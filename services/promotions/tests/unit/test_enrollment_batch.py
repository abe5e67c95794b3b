"""Deciding a batch of first logins (``domain.enrollment``), with plain values only: which
campaign a login belongs to, and who of a batch gets which slot."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from cake_promotions.domain.campaigns import Campaign, CampaignStatus, CampaignTerms
from cake_promotions.domain.enrollment import (
    CampaignHistory,
    EnrollmentResult,
    FirstLogin,
    SlotCount,
    SlotReservation,
    campaign_at_login,
    decide_batch,
    first_of_each_event,
)
from hypothesis import given
from hypothesis import strategies as st

T0 = datetime(2026, 12, 1, 12, tzinfo=UTC)
ENROLLED = EnrollmentResult.ENROLLED
FULL = EnrollmentResult.CAMPAIGN_FULL
ALREADY = EnrollmentResult.ALREADY_PARTICIPATED
NO_CAMPAIGN = EnrollmentResult.NO_CAMPAIGN


def login(user_id: int, seconds: float = 0.0) -> FirstLogin:
    return FirstLogin(user_id, T0 + timedelta(seconds=seconds), uuid.uuid4())


def campaign(
    campaign_id: int = 1,
    *,
    status: CampaignStatus = CampaignStatus.ACTIVE,
    created: datetime = T0 - timedelta(days=1),
    start: datetime = T0 - timedelta(hours=1),
    end: datetime = T0 + timedelta(hours=1),
) -> Campaign:
    return Campaign(
        id=campaign_id,
        name=f"campaign {campaign_id}",
        description="",
        type="first_login_discount",
        status=status,
        start_date=start,
        end_date=end,
        max_participants=100,
        current_participants=0,
        terms=CampaignTerms(Decimal("30"), Decimal("0"), None, 30),
        created_at=created,
        updated_at=created,
    )


def results(plan: object) -> list[tuple[EnrollmentResult, int | None]]:
    return [(d.result, d.participation_order) for d in plan.decisions]  # type: ignore[attr-defined]


def test_fewer_users_than_places_all_enroll_in_order_and_nobody_is_told_full() -> None:
    logins = [login(user, seconds=user) for user in range(50)]

    plan = decide_batch(logins, [1] * 50, {1: SlotCount(100, 0)}, set())

    assert results(plan) == [(ENROLLED, order) for order in range(1, 51)]
    assert plan.reservations == (SlotReservation(1, 0, 50),)


def test_more_users_than_places_fill_exactly_the_free_slots_then_full() -> None:
    logins = [login(user, seconds=user) for user in range(10)]

    plan = decide_batch(logins, [1] * 10, {1: SlotCount(100, 96)}, set())

    assert (
        results(plan)
        == [(ENROLLED, 97), (ENROLLED, 98), (ENROLLED, 99), (ENROLLED, 100)] + [(FULL, None)] * 6
    )
    assert plan.reservations == (SlotReservation(1, 96, 100),)
    assert plan.reservations[0].count == 4


def test_a_full_campaign_takes_nobody_and_reserves_nothing() -> None:
    plan = decide_batch([login(1), login(2)], [1, 1], {1: SlotCount(3, 3)}, set())

    assert results(plan) == [(FULL, None), (FULL, None)]
    assert plan.reservations == ()


def test_earlier_logins_get_earlier_places_whatever_the_batch_order() -> None:
    logins = [login(1, seconds=3), login(2, seconds=1), login(3, seconds=2), login(4, seconds=1)]

    plan = decide_batch(logins, [1] * 4, {1: SlotCount(3, 0)}, set())

    # User 2 and user 4 logged in at the same instant: the batch order breaks the tie.
    assert results(plan) == [(FULL, None), (ENROLLED, 1), (ENROLLED, 3), (ENROLLED, 2)]


def test_a_user_enrolled_before_or_twice_in_the_batch_takes_one_place() -> None:
    logins = [login(1, 0), login(2, 1), login(2, 2), login(3, 3)]

    plan = decide_batch(logins, [1] * 4, {1: SlotCount(10, 5)}, {(1, 1)})

    assert results(plan) == [(ALREADY, None), (ENROLLED, 6), (ALREADY, None), (ENROLLED, 7)]
    assert plan.reservations == (SlotReservation(1, 5, 7),)


def test_logins_without_a_campaign_and_in_two_campaigns() -> None:
    logins = [login(1, 0), login(2, 1), login(3, 2), login(4, 3)]

    plan = decide_batch(logins, [None, 7, 3, 7], {7: SlotCount(1, 0), 3: SlotCount(5, 2)}, {(3, 4)})

    assert results(plan) == [(NO_CAMPAIGN, None), (ENROLLED, 1), (ENROLLED, 3), (FULL, None)]
    assert [d.campaign_id for d in plan.decisions] == [None, 7, 3, 7]
    assert plan.reservations == (SlotReservation(3, 2, 3), SlotReservation(7, 0, 1))


def test_a_repeated_event_id_is_applied_once() -> None:
    first, other = login(1), login(2)
    again = FirstLogin(first.user_id, first.login_at, first.event_id)
    untracked = FirstLogin(3, T0)

    assert first_of_each_event([first, other, again, untracked, untracked]) == [0, 1, 3, 4]


@given(
    users=st.lists(st.integers(min_value=1, max_value=40), max_size=120),
    maximum=st.integers(min_value=1, max_value=60),
    taken=st.integers(min_value=0, max_value=60),
    enrolled_before=st.sets(st.integers(min_value=1, max_value=40), max_size=10),
)
def test_orders_continue_without_gap_or_repeat_and_never_pass_the_maximum(
    users: list[int], maximum: int, taken: int, enrolled_before: set[int]
) -> None:
    taken = min(taken, maximum)
    logins = [login(user, seconds=index % 7) for index, user in enumerate(users)]

    plan = decide_batch(
        logins,
        [1] * len(logins),
        {1: SlotCount(maximum, taken)},
        {(1, user) for user in enrolled_before},
    )

    orders = sorted(d.participation_order for d in plan.decisions if d.participation_order)
    new_users = set(users) - enrolled_before
    assert orders == list(range(taken + 1, taken + 1 + min(len(new_users), maximum - taken)))
    winners = [logins[k].user_id for k, d in enumerate(plan.decisions) if d.result is ENROLLED]
    assert len(winners) == len(set(winners))
    told_full = any(d.result is FULL for d in plan.decisions)
    assert told_full == (len(new_users) > maximum - taken)


def test_the_newest_campaign_running_at_the_login_time_is_chosen() -> None:
    old = CampaignHistory(campaign(1), ((T0 - timedelta(days=1), CampaignStatus.ACTIVE),))
    new = CampaignHistory(
        campaign(2, created=T0 - timedelta(hours=2)),
        ((T0 - timedelta(hours=2), CampaignStatus.ACTIVE),),
    )

    assert campaign_at_login([old, new], T0) == new.campaign
    assert campaign_at_login([new, old], T0) == new.campaign


def test_a_late_event_is_decided_by_the_status_at_its_login_time() -> None:
    paused_at = T0 + timedelta(minutes=1)
    history = CampaignHistory(
        campaign(1, status=CampaignStatus.INACTIVE),
        ((T0 - timedelta(days=1), CampaignStatus.ACTIVE), (paused_at, CampaignStatus.INACTIVE)),
    )

    assert campaign_at_login([history], T0) == history.campaign
    assert campaign_at_login([history], paused_at) is None
    # Before its first recorded change the campaign reads as it was first set.
    assert history.status_then(T0 - timedelta(days=2)) is CampaignStatus.ACTIVE


def test_no_campaign_outside_every_window_or_when_never_running() -> None:
    running = CampaignHistory(campaign(1), ((T0 - timedelta(days=1), CampaignStatus.ACTIVE),))
    paused = CampaignHistory(
        campaign(2, status=CampaignStatus.INACTIVE, created=T0),
        ((T0 - timedelta(days=1), CampaignStatus.INACTIVE),),
    )
    full = CampaignHistory(campaign(3, status=CampaignStatus.FULL, created=T0))

    assert campaign_at_login([running], T0 + timedelta(hours=1)) is None  # window is half-open
    assert campaign_at_login([running, paused], T0) == running.campaign
    # A full campaign still "runs": its late users are told it is full.
    assert campaign_at_login([running, full], T0) == full.campaign
