"""First-login enrolment (docs/architecture.md, "An event") and the eligibility question.

One use case serves the Kafka consumer (USER_FIRST_LOGIN events) and ``TrackFirstLogin``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from uuid import UUID

from cake_common.logging import get_logger

from cake_promotions.domain.campaigns import FIRST_LOGIN_DISCOUNT, Campaign, CampaignStatus
from cake_promotions.domain.enrolment import (
    DECISION_REASONS,
    Eligibility,
    EnrolmentOutcome,
    EnrolmentResult,
    FirstLoginDecision,
    Participation,
    ParticipationConflict,
    eligibility_for,
)
from cake_promotions.domain.vouchers import Voucher, generate_voucher_code, new_voucher
from cake_promotions.metrics import PromotionsMetrics
from cake_promotions.service.clock import Clock, utc_now
from cake_promotions.service.unit_of_work import PromotionsUnitOfWork, UnitOfWorkFactory

# 36^8 codes: a collision is already a one-in-billions event; five in a row is a bug.
_CODE_ATTEMPTS = 5
# A conflict proves the other enrolment committed, so one retry always settles it.
_CONFLICT_ATTEMPTS = 2
# An active campaign wins; a full one is only looked at to tell late users it is full.
_CAMPAIGN_PREFERENCE = (CampaignStatus.ACTIVE, CampaignStatus.FULL)

_log = get_logger(__name__)


class FirstLoginEnrolment:
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

    async def enrol_first_login(
        self, user_id: int, login_at: datetime, event_id: UUID | None = None
    ) -> EnrolmentOutcome | None:
        """Enrol the user into the newest active first-login campaign whose window contains
        ``login_at``, issuing their voucher, in one transaction.

        With ``event_id`` (from the consumer) the event is recorded in the inbox in that same
        transaction; ``None`` is returned if it was already applied, so redelivery changes
        nothing. A user already enrolled gets ``ALREADY_PARTICIPATED`` and no slot is taken.
        """
        for attempt in range(1, _CONFLICT_ATTEMPTS + 1):
            try:
                async with self._uow_factory() as uow:
                    if event_id is not None and not await uow.record_event_once(event_id):
                        return None
                    outcome = await self._enrol(uow, user_id, login_at)
                    await uow.enrolments.record_decision(
                        FirstLoginDecision(
                            user_id=user_id,
                            event_id=event_id,
                            login_at=login_at,
                            decided_at=self._clock(),
                            result=outcome.result,
                            campaign_id=outcome.campaign.id if outcome.campaign else None,
                            reason=DECISION_REASONS[outcome.result],
                        )
                    )
                    await uow.commit()
                break
            except ParticipationConflict:
                # The same user was enrolled by another transaction at the same moment (a
                # repeated event, or TrackFirstLogin racing the consumer). Everything here
                # was rolled back, slot included; the retry finds that participation.
                if attempt == _CONFLICT_ATTEMPTS:
                    raise
        self._metrics.enrolments.labels(result=outcome.result.value).inc()
        if outcome.result is not EnrolmentResult.ENROLLED:
            _log.info(
                "first login enrolled nobody",
                user_id=user_id,
                login_at=login_at.isoformat(),
                result=outcome.result.value,
                reason=DECISION_REASONS[outcome.result],
            )
        if outcome.result is EnrolmentResult.ENROLLED:
            self._metrics.vouchers_issued.inc()
            _log.info(
                "user enrolled",
                user_id=user_id,
                campaign_id=outcome.campaign.id if outcome.campaign else None,
                participation_order=(
                    outcome.participation.participation_order if outcome.participation else None
                ),
            )
        return outcome

    async def track_first_login(self, user_id: int) -> EnrolmentOutcome:
        """``TrackFirstLogin``: reports, never enrols. Enrolment is decided only by auth's
        USER_FIRST_LOGIN event (its login time); a client call cannot earn a voucher. Once
        enrolled the answer is Cake's ``eligible: false`` "already participated"."""
        async with self._uow_factory() as uow:
            enrolled = await uow.enrolments.latest_participation(
                FIRST_LOGIN_DISCOUNT, user_id=user_id
            )
            if enrolled is not None:
                campaign, participation = enrolled
                return await self._already_participated(uow, campaign, participation)
            decision = await uow.enrolments.decision_for(user_id)
        if decision is not None and decision.result in (
            EnrolmentResult.CAMPAIGN_FULL,
            EnrolmentResult.NO_CAMPAIGN,
        ):
            return EnrolmentOutcome(decision.result)
        return EnrolmentOutcome(EnrolmentResult.NOT_ENROLLED)

    async def _enrol(
        self, uow: PromotionsUnitOfWork, user_id: int, login_at: datetime
    ) -> EnrolmentOutcome:
        found = await uow.enrolments.campaign_at_login(
            FIRST_LOGIN_DISCOUNT, login_at, user_id=user_id
        )
        if found is None:
            return EnrolmentOutcome(EnrolmentResult.NO_CAMPAIGN)
        campaign, existing = found
        if existing is not None:
            return await self._already_participated(uow, campaign, existing)
        if campaign.is_full:
            return EnrolmentOutcome(EnrolmentResult.CAMPAIGN_FULL, campaign)

        enrolled = await uow.enrolments.take_slot_and_enrol(
            campaign, user_id=user_id, login_at=login_at, voucher_code=self._voucher_codes()
        )
        if enrolled is None:
            return EnrolmentOutcome(EnrolmentResult.CAMPAIGN_FULL, campaign)
        participation = enrolled.participation
        voucher = enrolled.voucher or await self._issue_voucher(
            uow, enrolled.campaign, participation
        )
        await uow.events.promotion_enrolled(
            participation, enrolled_at=voucher.issued_at, voucher_issued=True
        )
        await uow.events.voucher_issued(voucher, campaign_id=campaign.id)
        return EnrolmentOutcome(EnrolmentResult.ENROLLED, enrolled.campaign, participation, voucher)

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
    ) -> EnrolmentOutcome:
        vouchers = await uow.vouchers.list_for_participations([participation.id])
        return EnrolmentOutcome(
            EnrolmentResult.ALREADY_PARTICIPATED,
            campaign,
            participation,
            vouchers[0] if vouchers else None,
        )

    async def eligibility(self, user_id: int) -> Eligibility:
        """Would a first login now enrol the user? (Changes nothing but stale statuses.)"""
        now = self._clock()
        async with self._uow_factory() as uow:
            await uow.campaigns.expire_ended(now)
            found = await uow.enrolments.campaign_for_login(
                FIRST_LOGIN_DISCOUNT, now, _CAMPAIGN_PREFERENCE, user_id=user_id
            )
            await uow.commit()
        if found is None:
            return eligibility_for(None, already_participated=False)
        campaign, participation = found
        return eligibility_for(campaign, already_participated=participation is not None)
