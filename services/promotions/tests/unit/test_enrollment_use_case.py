"""The first-login enrollment use case against in-memory fakes of its unit of work: what a
batch writes (inbox, slot counter, participations, vouchers, outbox events, decisions), what
it answers, and what a redelivery, a voucher-code collision or a participation conflict do.
Which login gets which slot is ``decide_batch``'s (test_enrollment_batch.py); the SQL has
integration tests."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Self
from uuid import UUID

import pytest
from cake_promotions.domain.campaigns import Campaign, CampaignStatus, CampaignTerms
from cake_promotions.domain.enrollment import (
    DECISION_REASONS,
    ELIGIBLE_MESSAGE,
    CampaignHistory,
    EnrollmentResult,
    FirstLogin,
    FirstLoginDecision,
    Participation,
    ParticipationConflict,
    ParticipationStatus,
    SlotReservation,
)
from cake_promotions.domain.vouchers import NewVoucher, Voucher, VoucherStatus
from cake_promotions.metrics import PromotionsMetrics
from cake_promotions.service.enrollment import FirstLoginEnrollment
from cake_promotions.service.ports import Enrolled, NewEnrollment, NewEnrollmentEvents
from prometheus_client import CollectorRegistry

T0 = datetime(2026, 12, 1, 12, tzinfo=UTC)
DECIDED_AT = T0 + timedelta(minutes=5)
CAMPAIGN_TYPE = "first_login_discount"
ENROLLED = EnrollmentResult.ENROLLED
FULL = EnrollmentResult.CAMPAIGN_FULL
ALREADY = EnrollmentResult.ALREADY_PARTICIPATED
NO_CAMPAIGN = EnrollmentResult.NO_CAMPAIGN


def campaign(campaign_id: int = 1, *, slots: int = 2, taken: int = 0) -> Campaign:
    return Campaign(
        id=campaign_id,
        name=f"campaign {campaign_id}",
        description="",
        type=CAMPAIGN_TYPE,
        status=CampaignStatus.ACTIVE,
        start_date=T0 - timedelta(hours=1),
        end_date=T0 + timedelta(hours=1),
        max_participants=slots,
        current_participants=taken,
        terms=CampaignTerms(Decimal("30"), Decimal("0"), None, 30),
        created_at=T0 - timedelta(days=1),
        updated_at=T0 - timedelta(days=1),
    )


def login(user_id: int, seconds: float = 0.0) -> FirstLogin:
    return FirstLogin(user_id, T0 + timedelta(seconds=seconds), uuid.uuid4())


# -- fakes -------------------------------------------------------------------------------------


@dataclass
class Store:
    campaigns: dict[int, Campaign] = field(default_factory=dict)
    participations: list[Participation] = field(default_factory=list)
    vouchers: list[Voucher] = field(default_factory=list)
    inbox: set[UUID] = field(default_factory=set)
    decisions: dict[int, FirstLoginDecision] = field(default_factory=dict)
    events: list[NewEnrollmentEvents] = field(default_factory=list)
    locked: list[list[int]] = field(default_factory=list)
    commits: int = 0
    conflicts_to_raise: int = 0


def _voucher(
    code: str, participation: Participation, terms: CampaignTerms, at: datetime
) -> Voucher:
    return Voucher(
        id=1000 + participation.id,
        code=code,
        user_promotion_id=participation.id,
        user_id=participation.user_id,
        type="discount",
        status=VoucherStatus.ACTIVE,
        discount_percentage=terms.discount_percentage,
        min_topup_amount=terms.min_topup_amount,
        max_discount_amount=terms.max_discount_amount,
        issued_at=at,
        expires_at=at + timedelta(days=terms.voucher_validity_days),
        used_at=None,
        used_amount=None,
        discount_amount=None,
        transaction_reference=None,
    )


class FakeEnrollments:
    def __init__(self, store: Store) -> None:
        self._s = store

    async def candidate_campaigns(
        self, campaign_type: str, earliest: datetime, latest: datetime
    ) -> list[CampaignHistory]:
        return [
            CampaignHistory(c)
            for c in self._s.campaigns.values()
            if c.type == campaign_type and c.start_date <= latest and c.end_date > earliest
        ]

    async def lock_campaigns(self, campaign_ids: Sequence[int]) -> dict[int, Campaign]:
        self._s.locked.append(sorted(campaign_ids))
        return {i: self._s.campaigns[i] for i in campaign_ids}

    async def participations_of(
        self, campaign_ids: Sequence[int], user_ids: Sequence[int]
    ) -> list[Participation]:
        return [
            p
            for p in self._s.participations
            if p.campaign_id in campaign_ids and p.user_id in user_ids
        ]

    async def reserve_and_enroll(
        self, reservations: Sequence[SlotReservation], enrollments: Sequence[NewEnrollment]
    ) -> list[Enrolled]:
        if self._s.conflicts_to_raise:
            self._s.conflicts_to_raise -= 1
            raise ParticipationConflict
        for reservation in reservations:
            held = self._s.campaigns[reservation.campaign_id]
            assert held.current_participants == reservation.before
            self._s.campaigns[held.id] = replace(
                held,
                current_participants=reservation.after,
                status=CampaignStatus.FULL
                if reservation.after >= held.max_participants
                else held.status,
            )
        taken = {v.code for v in self._s.vouchers}
        enrolled = []
        for new in enrollments:
            after = self._s.campaigns[new.campaign_id]
            participation = Participation(
                id=len(self._s.participations) + 1,
                user_id=new.user_id,
                campaign_id=new.campaign_id,
                participation_order=new.participation_order,
                status=ParticipationStatus.VOUCHER_ISSUED,
                first_login_at=new.login_at,
                voucher_issued_at=DECIDED_AT,
                voucher_used_at=None,
                created_at=DECIDED_AT,
            )
            self._s.participations.append(participation)
            voucher = None
            if new.voucher_code not in taken:
                voucher = _voucher(new.voucher_code, participation, after.terms, DECIDED_AT)
                self._s.vouchers.append(voucher)
                taken.add(voucher.code)
            enrolled.append(Enrolled(after, participation, voucher))
        return enrolled

    async def record_decisions(self, decisions: Sequence[FirstLoginDecision]) -> None:
        for decision in decisions:
            self._s.decisions.setdefault(decision.user_id, decision)

    async def latest_participation(
        self, campaign_type: str, *, user_id: int
    ) -> tuple[Campaign, Participation] | None:
        mine = [p for p in self._s.participations if p.user_id == user_id]
        if not mine:
            return None
        return self._s.campaigns[mine[-1].campaign_id], mine[-1]

    async def decision_for(self, user_id: int) -> FirstLoginDecision | None:
        return self._s.decisions.get(user_id)

    async def campaign_for_login(
        self,
        campaign_type: str,
        at: datetime,
        statuses: Sequence[CampaignStatus],
        *,
        user_id: int,
    ) -> tuple[Campaign, Participation | None] | None:
        running = [
            c
            for c in self._s.campaigns.values()
            if c.status in statuses and c.window_contains(at) and c.type == campaign_type
        ]
        if not running:
            return None
        chosen = max(running, key=lambda c: c.created_at)
        mine = [
            p for p in self._s.participations if p.user_id == user_id and p.campaign_id == chosen.id
        ]
        return chosen, (mine[0] if mine else None)


class FakeVouchers:
    def __init__(self, store: Store) -> None:
        self._s = store

    async def add(self, voucher: NewVoucher) -> Voucher | None:
        if any(v.code == voucher.code for v in self._s.vouchers):
            return None
        participation = next(p for p in self._s.participations if p.id == voucher.user_promotion_id)
        issued = _voucher(voucher.code, participation, voucher.terms, voucher.issued_at)
        self._s.vouchers.append(issued)
        return issued

    async def list_for_participations(self, participation_ids: Sequence[int]) -> list[Voucher]:
        return [v for v in reversed(self._s.vouchers) if v.user_promotion_id in participation_ids]


class FakeCampaigns:
    async def expire_ended(self, now: datetime, campaign_id: int | None = None) -> None:
        pass


class FakeEvents:
    def __init__(self, store: Store) -> None:
        self._s = store

    async def enrolled(self, enrollments: Sequence[NewEnrollmentEvents]) -> None:
        self._s.events += enrollments


class FakeUnitOfWork:
    def __init__(self, store: Store) -> None:
        self._committed = store

    async def __aenter__(self) -> Self:
        self._work = copy.deepcopy(self._committed)
        self.enrollments = FakeEnrollments(self._work)
        self.vouchers = FakeVouchers(self._work)
        self.campaigns = FakeCampaigns()
        self.events = FakeEvents(self._work)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # Uncommitted work is dropped, but a conflict counter consumed here stays consumed.
        self._committed.conflicts_to_raise = self._work.conflicts_to_raise

    async def record_events_once(self, event_ids: Sequence[UUID]) -> set[UUID]:
        new = set(event_ids) - self._work.inbox
        self._work.inbox |= new
        return new

    async def commit(self) -> None:
        commits = self._committed.commits + 1
        self._committed.__dict__.update(copy.deepcopy(self._work).__dict__)
        self._committed.commits = commits


def codes(*drawn: str) -> Iterator[str]:
    yield from drawn
    for n in range(10_000):
        yield f"CODE{n:04d}"


def make(store: Store, *drawn: str) -> tuple[FirstLoginEnrollment, PromotionsMetrics]:
    metrics = PromotionsMetrics(CollectorRegistry())
    draw = codes(*drawn)
    use_case = FirstLoginEnrollment(
        lambda: FakeUnitOfWork(store),  # type: ignore[arg-type, return-value]
        metrics,
        clock=lambda: DECIDED_AT,
        voucher_codes=lambda: next(draw),
    )
    return use_case, metrics


# -- a batch -----------------------------------------------------------------------------------


async def test_a_batch_fills_the_free_slots_in_login_order_and_writes_everything_once() -> None:
    store = Store(campaigns={1: campaign(slots=2)})
    use_case, metrics = make(store, "AAAA1111", "BBBB2222")
    # Given out of order: user 30 logged in last.
    logins = [login(30, seconds=3), login(10, seconds=1), login(20, seconds=2)]

    outcomes = await use_case.enroll_batch(logins, trace_parents=["tp-30", "tp-10", "tp-20"])

    assert [o.result if o else None for o in outcomes] == [FULL, ENROLLED, ENROLLED]
    assert [o.participation.participation_order for o in outcomes[1:] if o and o.participation] == [
        1,
        2,
    ]
    assert [o.voucher.code for o in outcomes[1:] if o and o.voucher] == ["AAAA1111", "BBBB2222"]
    # Each answer shows the campaign as if the logins had come one by one.
    assert [
        (o.campaign.current_participants, o.campaign.status) for o in outcomes if o and o.campaign
    ] == [
        (2, CampaignStatus.FULL),
        (1, CampaignStatus.ACTIVE),
        (2, CampaignStatus.FULL),
    ]
    assert outcomes[0] is not None and not outcomes[0].eligible
    # One transaction: slots, inbox, events and decisions together.
    assert store.commits == 1
    assert store.locked == [[1]]
    assert (store.campaigns[1].current_participants, store.campaigns[1].status) == (
        2,
        CampaignStatus.FULL,
    )
    assert store.inbox == {login.event_id for login in logins}
    assert [(e.participation.user_id, e.voucher.code, e.trace_parent) for e in store.events] == [
        (10, "AAAA1111", "tp-10"),
        (20, "BBBB2222", "tp-20"),
    ]
    assert {u: (d.result, d.campaign_id, d.reason) for u, d in store.decisions.items()} == {
        30: (FULL, 1, DECISION_REASONS[FULL]),
        10: (ENROLLED, 1, DECISION_REASONS[ENROLLED]),
        20: (ENROLLED, 1, DECISION_REASONS[ENROLLED]),
    }
    assert all(d.decided_at == DECIDED_AT for d in store.decisions.values())
    assert metrics.enrollments.labels(result="enrolled")._value.get() == 2
    assert metrics.enrollments.labels(result="campaign_full")._value.get() == 1
    assert metrics.vouchers_issued._value.get() == 2


async def test_a_redelivered_event_changes_nothing_and_answers_none() -> None:
    store = Store(campaigns={1: campaign(slots=5)})
    use_case, metrics = make(store)
    first = login(10)
    await use_case.enroll_batch([first])
    before = copy.deepcopy(store)

    again = await use_case.enroll_batch([first, replace(first)])

    assert again == [None, None]
    assert store.participations == before.participations
    assert store.campaigns == before.campaigns
    assert store.events == before.events
    assert metrics.enrollments.labels(result="enrolled")._value.get() == 1


async def test_an_earlier_participant_is_told_so_with_the_voucher_they_have() -> None:
    store = Store(campaigns={1: campaign(slots=5)})
    use_case, _ = make(store, "FIRST001")
    await use_case.enroll_batch([login(10)])

    (outcome,) = await use_case.enroll_batch([login(10, seconds=9)])

    assert outcome is not None
    assert outcome.result is ALREADY
    assert outcome.voucher is not None and outcome.voucher.code == "FIRST001"
    assert store.campaigns[1].current_participants == 1
    assert len(store.events) == 1


async def test_a_login_outside_every_campaign_is_recorded_as_no_campaign() -> None:
    store = Store(campaigns={1: campaign()})
    use_case, _ = make(store)
    late = FirstLogin(10, T0 + timedelta(hours=2), uuid.uuid4())

    (outcome,) = await use_case.enroll_batch([late])

    assert outcome is not None and outcome.result is NO_CAMPAIGN and outcome.campaign is None
    assert store.decisions[10].result is NO_CAMPAIGN and store.decisions[10].campaign_id is None
    assert store.participations == [] and store.events == []
    assert store.locked == [[]]


async def test_a_taken_voucher_code_is_drawn_again() -> None:
    store = Store(campaigns={1: campaign(slots=5)})
    use_case, _ = make(store, "SAMECODE", "SAMECODE", "SAMECODE", "FRESH001")
    await use_case.enroll_batch([login(10)])

    (outcome,) = await use_case.enroll_batch([login(20)])

    assert outcome is not None and outcome.voucher is not None
    assert outcome.voucher.code == "FRESH001"
    assert [e.voucher.code for e in store.events] == ["SAMECODE", "FRESH001"]


async def test_a_participation_conflict_retries_the_whole_batch_once() -> None:
    store = Store(campaigns={1: campaign(slots=5)}, conflicts_to_raise=1)
    use_case, _ = make(store)
    logins = [login(10), login(20, seconds=1)]

    outcomes = await use_case.enroll_batch(logins)

    assert [o.result for o in outcomes if o] == [ENROLLED, ENROLLED]
    # The first attempt's inbox entries were rolled back with it, so the retry applied them.
    assert store.commits == 1
    assert store.campaigns[1].current_participants == 2
    assert len(store.participations) == 2


async def test_two_conflicts_in_a_row_are_raised() -> None:
    store = Store(campaigns={1: campaign(slots=5)}, conflicts_to_raise=2)
    use_case, _ = make(store)

    with pytest.raises(ParticipationConflict):
        await use_case.enroll_batch([login(10)])

    assert store.commits == 0 and store.inbox == set()


async def test_trace_parents_must_match_the_logins() -> None:
    use_case, _ = make(Store())

    with pytest.raises(ValueError, match="one trace parent"):
        await use_case.enroll_batch([login(10)], trace_parents=[])


# -- the questions ---------------------------------------------------------------------------------


async def test_track_first_login_reports_without_enrolling() -> None:
    store = Store(campaigns={1: campaign(slots=1)})
    use_case, _ = make(store, "ONLY0001")
    await use_case.enroll_batch([login(10), login(20, seconds=1)])

    enrolled = await use_case.track_first_login(10)
    too_late = await use_case.track_first_login(20)
    never = await use_case.track_first_login(30)

    assert enrolled.result is ALREADY and not enrolled.eligible
    assert enrolled.voucher is not None and enrolled.voucher.code == "ONLY0001"
    assert too_late.result is FULL
    assert never.result is EnrollmentResult.NOT_ENROLLED
    assert store.campaigns[1].current_participants == 1


async def test_eligibility_is_true_only_with_a_free_slot_and_no_participation() -> None:
    store = Store(campaigns={1: campaign(slots=1)})
    use_case, _ = make(store)

    # The eligibility question is asked "now" (DECIDED_AT), inside the campaign's window.
    free = await use_case.eligibility(10)
    await use_case.enroll_batch([login(10)])
    participated = await use_case.eligibility(10)
    full = await use_case.eligibility(20)

    assert (free.eligible, free.message) == (True, ELIGIBLE_MESSAGE)
    assert free.campaign is not None and free.campaign.id == 1
    assert (participated.eligible, participated.message) == (
        False,
        "User already participated in this campaign",
    )
    assert full.eligible is False
    assert full.campaign is not None and full.campaign.status is CampaignStatus.FULL
