"""First-login enrollment (docs/architecture.md, "An event"; docs/enrollment.md) and the
eligibility question.

One use case serves the Kafka consumer (a whole poll batch of USER_FIRST_LOGIN events in one
transaction) and ``TrackFirstLogin``. What each login of a batch gets is decided by the pure
``domain.enrollment.decide_batch`` from what is read under the campaign row lock; this module
only reads, asks, and writes the answer back in a fixed number of statements per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from uuid import UUID

from cake_common.logging import get_logger

from cake_promotions.domain.campaigns import FIRST_LOGIN_DISCOUNT, Campaign, CampaignStatus
from cake_promotions.domain.enrollment import (
    DECISION_REASONS,
    BatchPlan,
    Eligibility,
    EnrollmentOutcome,
    EnrollmentResult,
    FirstLogin,
    FirstLoginDecision,
    LoginDecision,
    Participation,
    ParticipationConflict,
    SlotCount,
    campaign_at_login,
    decide_batch,
    eligibility_for,
    first_of_each_event,
)
from cake_promotions.domain.vouchers import Voucher, generate_voucher_code, new_voucher
from cake_promotions.metrics import PromotionsMetrics
from cake_promotions.service.clock import Clock, utc_now
from cake_promotions.service.ports import (
    Enrolled,
    NewEnrollment,
    NewEnrollmentEvents,
    PromotionsUnitOfWork,
    UnitOfWorkFactory,
)

# 36^8 codes: a collision is already a one-in-billions event; five in a row is a bug.
_CODE_ATTEMPTS = 5
# A conflict proves the other enrollment committed, so one retry always settles it.
_CONFLICT_ATTEMPTS = 2
# An active campaign wins; a full one is only looked at to tell late users it is full.
_CAMPAIGN_PREFERENCE = (CampaignStatus.ACTIVE, CampaignStatus.FULL)

_log = get_logger(__name__)


def _as_after(enrolled: Enrolled) -> Campaign:
    """The campaign as this enrollment left it, as if the batch had come one by one: its
    counter at this participant's order (full once the last slot is taken)."""
    order = enrolled.participation.participation_order
    campaign = enrolled.campaign
    if order >= campaign.current_participants:
        return campaign
    status = CampaignStatus.ACTIVE if campaign.status is CampaignStatus.FULL else campaign.status
    return replace(campaign, current_participants=order, status=status)


class FirstLoginEnrollment:
    def __init__(
        self,
        uow_factory: UnitOfWorkFactory,
        metrics: PromotionsMetrics,
        *,
        clock: Clock = utc_now,
        voucher_codes: Callable[[], str] = generate_voucher_code,
    ) -> None:
        self._uow_factory = uow_factory
        self._metrics = metrics
        self._clock = clock
        self._voucher_codes = voucher_codes

    async def enroll_first_login(
        self, user_id: int, login_at: datetime, event_id: UUID | None = None
    ) -> EnrollmentOutcome | None:
        """:meth:`enroll_batch` for one login: ``None`` if its event was already applied."""
        (outcome,) = await self.enroll_batch([FirstLogin(user_id, login_at, event_id)])
        return outcome

    async def enroll_batch(
        self,
        logins: Sequence[FirstLogin],
        *,
        trace_parents: Sequence[str | None] | None = None,
    ) -> list[EnrollmentOutcome | None]:
        """Enroll a batch of first logins in ONE transaction; one outcome per login, in order.

        Each login is decided as if the batch came one by one in login-time order: into the
        newest first-login campaign running at its login time, taking the next slot and a
        voucher, or "already participated", "campaign is full", "no campaign". Logins with
        an ``event_id`` go into the inbox in that same transaction: one already applied (or
        repeated within the batch) gets ``None`` and changes nothing, so redelivery is
        harmless. ``trace_parents[i]`` is the trace the events of login ``i`` continue.
        """
        if not logins:
            return []
        parents = list(trace_parents) if trace_parents is not None else [None] * len(logins)
        if len(parents) != len(logins):
            raise ValueError("one trace parent (or None) per login")
        for attempt in range(1, _CONFLICT_ATTEMPTS + 1):
            try:
                async with self._uow_factory() as uow:
                    outcomes = await self._enroll(uow, logins, parents)
                    await uow.commit()
                break
            except ParticipationConflict:
                # A user was enrolled by a transaction that did not take the campaign lock
                # (none does today). Everything here was rolled back, slots included; the
                # retry reads that participation under the lock.
                if attempt == _CONFLICT_ATTEMPTS:
                    raise
        self._report(logins, outcomes)
        return outcomes

    async def _enroll(
        self,
        uow: PromotionsUnitOfWork,
        logins: Sequence[FirstLogin],
        trace_parents: Sequence[str | None],
    ) -> list[EnrollmentOutcome | None]:
        outcomes: list[EnrollmentOutcome | None] = [None] * len(logins)
        positions = await self._fresh(uow, logins)
        if not positions:
            return outcomes
        batch = [logins[i] for i in positions]

        # Which campaign each login belongs to (no lock: the window and the status history
        # do not depend on the slots).
        candidates = await uow.enrollments.candidate_campaigns(
            FIRST_LOGIN_DISCOUNT,
            min(login.login_at for login in batch),
            max(login.login_at for login in batch),
        )
        chosen = [campaign_at_login(candidates, login.login_at) for login in batch]
        campaigns = {campaign.id: campaign for campaign in chosen if campaign is not None}
        # The slots: campaigns with room are locked and re-read; a full one stays full.
        open_ids = [campaign.id for campaign in campaigns.values() if not campaign.is_full]
        campaigns |= await uow.enrollments.lock_campaigns(open_ids)
        existing = await uow.enrollments.participations_of(
            list(campaigns), [login.user_id for login in batch]
        )
        plan = decide_batch(
            batch,
            [campaign.id if campaign is not None else None for campaign in chosen],
            {
                campaign.id: SlotCount(campaign.max_participants, campaign.current_participants)
                for campaign in campaigns.values()
            },
            {(p.campaign_id, p.user_id) for p in existing},
        )

        won = await self._enroll_winners(uow, batch, plan)
        await uow.events.enrolled(
            [
                NewEnrollmentEvents(
                    enrollment.participation, enrollment.voucher, trace_parents[positions[k]]
                )
                for k, enrollment in won.items()
                if enrollment.voucher is not None
            ]
        )
        participations = {(p.campaign_id, p.user_id): p for p in existing}
        vouchers = await self._vouchers_of_earlier_participations(uow, existing)
        for enrollment in won.values():
            participations[(enrollment.campaign.id, enrollment.participation.user_id)] = (
                enrollment.participation
            )
            campaigns[enrollment.campaign.id] = enrollment.campaign
            if enrollment.voucher is not None:
                vouchers[enrollment.participation.id] = enrollment.voucher

        for k, decision in enumerate(plan.decisions):
            campaign = campaigns.get(decision.campaign_id) if decision.campaign_id else None
            if k in won:
                enrollment = won[k]
                outcome = EnrollmentOutcome(
                    decision.result,
                    _as_after(enrollment),
                    enrollment.participation,
                    enrollment.voucher,
                )
            elif decision.result is EnrollmentResult.ALREADY_PARTICIPATED and campaign:
                participation = participations[(campaign.id, batch[k].user_id)]
                outcome = EnrollmentOutcome(
                    decision.result, campaign, participation, vouchers.get(participation.id)
                )
            else:
                outcome = EnrollmentOutcome(decision.result, campaign)
            outcomes[positions[k]] = outcome
        await uow.enrollments.record_decisions(self._decisions(batch, plan.decisions))
        return outcomes

    @staticmethod
    async def _fresh(uow: PromotionsUnitOfWork, logins: Sequence[FirstLogin]) -> list[int]:
        """Positions of the logins to apply: their events go into the inbox now (a repeat
        within the batch, or an event applied before, is left out)."""
        kept = first_of_each_event(logins)
        event_ids = [event_id for i in kept if (event_id := logins[i].event_id) is not None]
        recorded = await uow.record_events_once(event_ids) if event_ids else set()
        return [i for i in kept if logins[i].event_id is None or logins[i].event_id in recorded]

    async def _enroll_winners(
        self, uow: PromotionsUnitOfWork, batch: Sequence[FirstLogin], plan: BatchPlan
    ) -> dict[int, Enrolled]:
        """Take the plan's slots and issue its vouchers; batch index -> enrollment."""
        winners = [
            (k, decision.campaign_id, decision.participation_order)
            for k, decision in enumerate(plan.decisions)
            if decision.campaign_id is not None and decision.participation_order is not None
        ]
        enrolled = await uow.enrollments.reserve_and_enroll(
            plan.reservations,
            [
                NewEnrollment(
                    user_id=batch[k].user_id,
                    campaign_id=campaign_id,
                    participation_order=order,
                    login_at=batch[k].login_at,
                    voucher_code=self._voucher_codes(),
                )
                for k, campaign_id, order in winners
            ],
        )
        won: dict[int, Enrolled] = {}
        for (k, _, _), enrollment in zip(winners, enrolled, strict=True):
            if enrollment.voucher is None:  # its code was taken: draw another
                voucher = await self._issue_voucher(
                    uow, enrollment.campaign, enrollment.participation
                )
                enrollment = replace(enrollment, voucher=voucher)  # noqa: PLW2901
            won[k] = enrollment
        return won

    def _decisions(
        self, batch: Sequence[FirstLogin], decisions: Sequence[LoginDecision]
    ) -> list[FirstLoginDecision]:
        """What to keep per login, in login-time order (the order they were decided in, so
        for a user with two logins in the batch the kept one is the one that decided)."""
        decided_at = self._clock()
        in_login_order = sorted(range(len(batch)), key=lambda k: batch[k].login_at)
        return [
            FirstLoginDecision(
                user_id=batch[k].user_id,
                event_id=batch[k].event_id,
                login_at=batch[k].login_at,
                decided_at=decided_at,
                result=decisions[k].result,
                campaign_id=decisions[k].campaign_id,
                reason=DECISION_REASONS[decisions[k].result],
            )
            for k in in_login_order
        ]

    @staticmethod
    async def _vouchers_of_earlier_participations(
        uow: PromotionsUnitOfWork, existing: Sequence[Participation]
    ) -> dict[int, Voucher]:
        """Participation id -> voucher, for participations that were there before the batch
        (what "already participated" shows)."""
        if not existing:
            return {}
        found: dict[int, Voucher] = {}
        # Newest first: the first voucher seen per participation is the one shown.
        for voucher in await uow.vouchers.list_for_participations([p.id for p in existing]):
            found.setdefault(voucher.user_promotion_id, voucher)
        return found

    def _report(
        self, logins: Sequence[FirstLogin], outcomes: Sequence[EnrollmentOutcome | None]
    ) -> None:
        nobody: dict[EnrollmentResult, list[int]] = {}
        for login, outcome in zip(logins, outcomes, strict=True):
            if outcome is None:
                continue
            self._metrics.enrollments.labels(result=outcome.result.value).inc()
            if outcome.result is EnrollmentResult.ENROLLED:
                self._metrics.vouchers_issued.inc()
                _log.info(
                    "user enrolled",
                    user_id=login.user_id,
                    campaign_id=outcome.campaign.id if outcome.campaign else None,
                    participation_order=(
                        outcome.participation.participation_order if outcome.participation else None
                    ),
                )
            else:
                nobody.setdefault(outcome.result, []).append(login.user_id)
        # One line per result and batch (each decision is also kept in the database).
        for result, user_ids in nobody.items():
            _log.info(
                "first logins enrolled nobody",
                result=result.value,
                reason=DECISION_REASONS[result],
                count=len(user_ids),
                user_ids=user_ids[:50],
            )

    async def track_first_login(self, user_id: int) -> EnrollmentOutcome:
        """``TrackFirstLogin``: reports, never enrolls. Enrollment is decided only by auth's
        USER_FIRST_LOGIN event (its login time); a client call cannot earn a voucher. Once
        enrolled the answer is Cake's ``eligible: false`` "already participated"."""
        async with self._uow_factory() as uow:
            enrolled = await uow.enrollments.latest_participation(
                FIRST_LOGIN_DISCOUNT, user_id=user_id
            )
            if enrolled is not None:
                campaign, participation = enrolled
                return await self._already_participated(uow, campaign, participation)
            decision = await uow.enrollments.decision_for(user_id)
        if decision is not None and decision.result in (
            EnrollmentResult.CAMPAIGN_FULL,
            EnrollmentResult.NO_CAMPAIGN,
        ):
            return EnrollmentOutcome(decision.result)
        return EnrollmentOutcome(EnrollmentResult.NOT_ENROLLED)

    async def _issue_voucher(
        self, uow: PromotionsUnitOfWork, campaign: Campaign, participation: Participation
    ) -> Voucher:
        """Issue the voucher with a fresh code, after the first one drawn was taken."""
        issued_at = participation.voucher_issued_at or self._clock()
        for _ in range(_CODE_ATTEMPTS - 1):
            voucher = await uow.vouchers.add(
                new_voucher(
                    code=self._voucher_codes(),
                    user_promotion_id=participation.id,
                    user_id=participation.user_id,
                    terms=campaign.terms,
                    issued_at=issued_at,
                )
            )
            if voucher is not None:
                return voucher
            _log.warning("voucher code collision, drawing another", campaign_id=campaign.id)
        raise RuntimeError(f"no free voucher code after {_CODE_ATTEMPTS} attempts")

    @staticmethod
    async def _already_participated(
        uow: PromotionsUnitOfWork, campaign: Campaign, participation: Participation
    ) -> EnrollmentOutcome:
        vouchers = await uow.vouchers.list_for_participations([participation.id])
        return EnrollmentOutcome(
            EnrollmentResult.ALREADY_PARTICIPATED,
            campaign,
            participation,
            vouchers[0] if vouchers else None,
        )

    async def eligibility(self, user_id: int) -> Eligibility:
        """Would a first login now enroll the user? (Changes nothing but stale statuses.)"""
        now = self._clock()
        async with self._uow_factory() as uow:
            await uow.campaigns.expire_ended(now)
            found = await uow.enrollments.campaign_for_login(
                FIRST_LOGIN_DISCOUNT, now, _CAMPAIGN_PREFERENCE, user_id=user_id
            )
            await uow.commit()
        if found is None:
            return eligibility_for(None, already_participated=False)
        campaign, participation = found
        return eligibility_for(campaign, already_participated=participation is not None)
