"""What the use cases need from the outside world; adapters implement these.

The repositories and the event recorder work inside one unit of work (one database
transaction); the payment gateway is called outside any transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Protocol
from uuid import UUID

from cake_common.audit import AuditEntry
from cake_common.db import TransactionPort

from cake_promotions.domain.campaigns import Campaign, CampaignStatus, NewCampaign
from cake_promotions.domain.enrollment import (
    CampaignHistory,
    FirstLoginDecision,
    Participation,
    SlotReservation,
)
from cake_promotions.domain.payments import PaymentRequest, PaymentResult
from cake_promotions.domain.topups import TopupReceipt, TopupRecord, TopupStatus
from cake_promotions.domain.vouchers import NewVoucher, Voucher


@dataclass(frozen=True, slots=True)
class NewEnrollment:
    """A slot a batch won: the user's participation in that order, and a voucher code."""

    user_id: int
    campaign_id: int
    participation_order: int
    login_at: datetime
    voucher_code: str


@dataclass(frozen=True, slots=True)
class Enrolled:
    campaign: Campaign
    """The campaign as the batch left it (counter, status)."""
    participation: Participation
    voucher: Voucher | None
    """``None`` only if the voucher code was taken (the caller draws another)."""


@dataclass(frozen=True, slots=True)
class NewEnrollmentEvents:
    """What one enrollment announces: PROMOTION_ENROLLMENT, then VOUCHER_ISSUED."""

    participation: Participation
    voucher: Voucher
    trace_parent: str | None = None
    """The enrolling login's trace (``None``: the current span's)."""


@dataclass(frozen=True, slots=True)
class StoredKey:
    """What an idempotency key holds."""

    fingerprint: str
    receipt: TopupReceipt | None
    """The answer to replay; ``None`` while the key's top-up is pending."""
    transaction_id: str | None


class CampaignRepository(Protocol):
    async def add(self, campaign: NewCampaign) -> Campaign: ...

    async def get(self, campaign_id: int, *, for_update: bool = False) -> Campaign | None: ...

    async def list_with_status(self, status: CampaignStatus) -> list[Campaign]: ...

    async def set_status(
        self, campaign_id: int, status: CampaignStatus, now: datetime
    ) -> Campaign: ...

    async def expire_ended(self, now: datetime, campaign_id: int | None = None) -> None:
        """Store ``expired`` on campaigns whose end date has passed (all, or just one)."""
        ...


class ParticipationRepository(Protocol):
    async def list_for_user(self, user_id: int) -> list[tuple[Participation, Campaign]]:
        """The user's participations with their campaigns, newest first."""
        ...

    async def mark_voucher_used(self, participation_id: int, used_at: datetime) -> None: ...


class VoucherRepository(Protocol):
    async def add(self, voucher: NewVoucher) -> Voucher | None:
        """Insert the voucher; ``None`` if its code is already taken (caller draws again)."""
        ...

    async def get_by_code(self, code: str, *, for_update: bool = False) -> Voucher | None: ...

    async def list_for_user(self, user_id: int) -> list[Voucher]: ...

    async def list_for_participations(self, participation_ids: Sequence[int]) -> list[Voucher]: ...

    async def expire_overdue(
        self, now: datetime, *, user_id: int | None = None, code: str | None = None
    ) -> None:
        """Store ``expired`` on active vouchers past their expiry (of one user or one code)."""
        ...

    async def reserve(self, voucher_id: int, *, until: datetime, now: datetime) -> None:
        """Hold the (locked, active) voucher for a pending top-up until ``until``."""
        ...

    async def release(self, voucher_id: int, now: datetime) -> None:
        """Make a reserved voucher active again (its top-up was not charged)."""
        ...

    async def mark_used(
        self,
        voucher_id: int,
        *,
        used_at: datetime,
        used_amount: Decimal,
        discount_amount: Decimal,
        transaction_reference: str,
    ) -> Voucher:
        """Spend the voucher reserved for the top-up ``transaction_reference``."""
        ...


class EnrollmentRepository(Protocol):
    async def campaign_for_login(
        self,
        campaign_type: str,
        at: datetime,
        statuses: Sequence[CampaignStatus],
        *,
        user_id: int,
    ) -> tuple[Campaign, Participation | None] | None:
        """The newest campaign of ``campaign_type`` in one of ``statuses`` running at
        ``at``, with the user's participation in it, if any."""
        ...

    async def latest_participation(
        self, campaign_type: str, *, user_id: int
    ) -> tuple[Campaign, Participation] | None:
        """The user's newest participation in a campaign of ``campaign_type``."""
        ...

    async def decision_for(self, user_id: int) -> FirstLoginDecision | None: ...

    async def candidate_campaigns(
        self, campaign_type: str, earliest: datetime, latest: datetime
    ) -> list[CampaignHistory]:
        """The campaigns of ``campaign_type`` whose window overlaps ``[earliest, latest]``."""
        ...

    async def lock_campaigns(self, campaign_ids: Sequence[int]) -> dict[int, Campaign]:
        """Lock the campaigns' rows (in id order) and read them."""
        ...

    async def participations_of(
        self, campaign_ids: Sequence[int], user_ids: Sequence[int]
    ) -> list[Participation]: ...

    async def reserve_and_enroll(
        self, reservations: Sequence[SlotReservation], enrollments: Sequence[NewEnrollment]
    ) -> list[Enrolled]:
        """Move each campaign's slot counter as reserved and record every enrollment."""
        ...

    async def record_decisions(self, decisions: Sequence[FirstLoginDecision]) -> None:
        """Keep what each user's first-login event decided, and why."""
        ...


class TopupRepository(Protocol):
    async def add(self, record: TopupRecord) -> None: ...

    async def get(self, transaction_id: str, *, for_update: bool = False) -> TopupRecord | None: ...

    async def set_status(self, transaction_id: str, status: TopupStatus, now: datetime) -> None: ...

    async def pending_created_before(self, instant: datetime, *, limit: int) -> list[str]:
        """Transaction ids of pending top-ups created before ``instant``, oldest first."""
        ...


class IdempotencyKeyRepository(Protocol):
    async def claim(self, user_id: int, key: str, fingerprint: str, transaction_id: str) -> bool:
        """Reserve ``key`` for the top-up ``transaction_id``; False if it is already taken
        (a concurrent claim of the same key waits until this transaction ends)."""
        ...

    async def get(self, user_id: int, key: str) -> StoredKey | None:
        """What a committed key holds, or ``None``."""
        ...

    async def delete_created_before(self, age_seconds: float, *, limit: int) -> int:
        """Delete up to ``limit`` keys older than ``age_seconds``; how many went."""
        ...

    async def forget(self, user_id: int, key: str) -> None:
        """Free the key: its top-up failed, so a retry may try again."""
        ...

    async def store_receipt(self, user_id: int, key: str, receipt: TopupReceipt) -> None:
        """Keep the answer a retry with this key gets back."""
        ...


class EventRecorder(Protocol):
    """The promotions events, written to the outbox in the unit of work's transaction."""

    async def security_audit(self, entry: AuditEntry) -> None: ...

    async def enrolled(self, enrollments: Sequence[NewEnrollmentEvents]) -> None:
        """The events of many enrollments, each user's two in order."""
        ...

    async def voucher_used(
        self,
        voucher: Voucher,
        *,
        transaction_id: str,
        used_amount: Decimal,
        discount_amount: Decimal,
        used_at: datetime,
    ) -> None: ...

    async def payment_processed(self, record: TopupRecord, *, processed_at: datetime) -> None:
        """The payment's state: pending when the top-up is recorded, then how it ended."""
        ...


class PromotionsUnitOfWork(TransactionPort, Protocol):
    """One transaction: every repository, the event recorder and the inbox see and write
    the same data."""

    @property
    def campaigns(self) -> CampaignRepository: ...

    @property
    def enrollments(self) -> EnrollmentRepository: ...

    @property
    def participations(self) -> ParticipationRepository: ...

    @property
    def vouchers(self) -> VoucherRepository: ...

    @property
    def topups(self) -> TopupRepository: ...

    @property
    def idempotency_keys(self) -> IdempotencyKeyRepository: ...

    @property
    def events(self) -> EventRecorder: ...

    async def rollback(self) -> None:
        """Undo what this transaction did so far; the unit of work stays usable."""
        ...

    async def record_events_once(self, event_ids: Iterable[UUID]) -> set[UUID]:
        """Put consumed events' ids in the inbox; the ids recorded now (the others were
        applied before)."""
        ...


class UnitOfWorkFactory(Protocol):
    def __call__(self) -> PromotionsUnitOfWork: ...


class PaymentGateway(Protocol):
    """The bank. Called outside any database transaction, with the top-up already recorded
    pending; ``transaction_id`` is the bank's idempotency key, so a repeated charge never
    debits twice. Neither method raises for an unreachable bank: that is
    ``PaymentOutcome.UNKNOWN``."""

    async def charge(self, request: PaymentRequest) -> PaymentResult: ...

    async def settle_status(self, transaction_id: str) -> PaymentResult:
        """Whether ``transaction_id`` was charged, as a final answer: an id never charged is
        voided at the bank, so a charge still in flight can no longer go through."""
        ...

    async def close(self) -> None: ...
