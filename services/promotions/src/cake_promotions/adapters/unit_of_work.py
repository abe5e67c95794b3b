"""The promotions unit of work: one transaction, every repository on it."""

from __future__ import annotations

from collections.abc import Iterable
from uuid import UUID

from cake_common.inbox import record_many
from cake_common.outbox import OutboxUnitOfWork
from sqlalchemy.ext.asyncio import AsyncSession

from cake_promotions.adapters.events import PromotionEvents
from cake_promotions.adapters.repository import (
    CampaignRepository,
    EnrollmentRepository,
    IdempotencyKeyRepository,
    ParticipationRepository,
    TopupRepository,
    VoucherRepository,
)

CONSUMER_NAME = "promotions"
"""This service's name in the inbox table."""


class SqlPromotionsUnitOfWork(OutboxUnitOfWork):
    campaigns: CampaignRepository
    enrollments: EnrollmentRepository
    participations: ParticipationRepository
    vouchers: VoucherRepository
    topups: TopupRepository
    idempotency_keys: IdempotencyKeyRepository
    events: PromotionEvents

    def bind_repositories(self, session: AsyncSession) -> None:
        self.campaigns = CampaignRepository(session)
        self.enrollments = EnrollmentRepository(session)
        self.participations = ParticipationRepository(session)
        self.vouchers = VoucherRepository(session)
        self.topups = TopupRepository(session)
        self.idempotency_keys = IdempotencyKeyRepository(session)
        self.events = PromotionEvents(session, self.outbox_writer)

    async def record_events_once(self, event_ids: Iterable[UUID]) -> set[UUID]:
        """Put many consumed events' ids in the inbox in one statement; the ids recorded now
        (the others were applied before)."""
        return await record_many(self.session, event_ids, CONSUMER_NAME)
