"""The promotions unit of work: one transaction, every repository on it."""

from __future__ import annotations

from collections.abc import Callable
from uuid import UUID

from cake_common.db import UnitOfWork
from cake_common.inbox import record_once
from cake_common.outbox import OutboxWriter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cake_promotions.adapters.events import PromotionEvents
from cake_promotions.adapters.repository import (
    CampaignRepository,
    EnrolmentRepository,
    IdempotencyKeyRepository,
    ParticipationRepository,
    TopupRepository,
    VoucherRepository,
)

CONSUMER_NAME = "promotions"
"""This service's name in the inbox table."""


class PromotionsUnitOfWork(UnitOfWork):
    campaigns: CampaignRepository
    enrolments: EnrolmentRepository
    participations: ParticipationRepository
    vouchers: VoucherRepository
    topups: TopupRepository
    idempotency_keys: IdempotencyKeyRepository
    events: PromotionEvents

    def __init__(
        self, session_factory: async_sessionmaker[AsyncSession], outbox_writer: OutboxWriter
    ) -> None:
        super().__init__(session_factory)
        self._outbox_writer = outbox_writer

    def bind_repositories(self, session: AsyncSession) -> None:
        self.campaigns = CampaignRepository(session)
        self.enrolments = EnrolmentRepository(session)
        self.participations = ParticipationRepository(session)
        self.vouchers = VoucherRepository(session)
        self.topups = TopupRepository(session)
        self.idempotency_keys = IdempotencyKeyRepository(session)
        self.events = PromotionEvents(session, self._outbox_writer)

    async def record_event_once(self, event_id: UUID) -> bool:
        """Put a consumed event's id in the inbox; False if it was applied before."""
        return await record_once(self.session, event_id, CONSUMER_NAME)


UnitOfWorkFactory = Callable[[], PromotionsUnitOfWork]
