"""PostgreSQL repositories (SQLAlchemy Core on the unit of work's session).

Every statement runs inside the caller's transaction; nothing here commits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, cast

import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncSession

from cake_promotions.adapters.receipts import decode_receipt, encode_receipt
from cake_promotions.adapters.tables import (
    campaign_status_changes,
    campaigns,
    first_login_decisions,
    idempotency_keys,
    topups,
    user_promotions,
    vouchers,
)
from cake_promotions.domain.campaigns import (
    EXPIRABLE_STATUSES,
    Campaign,
    CampaignStatus,
    CampaignTerms,
    NewCampaign,
)
from cake_promotions.domain.enrollment import (
    CampaignHistory,
    EnrollmentResult,
    FirstLoginDecision,
    Participation,
    ParticipationConflict,
    ParticipationStatus,
    SlotReservation,
)
from cake_promotions.domain.topups import TopupReceipt, TopupRecord, TopupStatus
from cake_promotions.domain.vouchers import DISCOUNT_VOUCHER, NewVoucher, Voucher, VoucherStatus
from cake_promotions.service.ports import Enrolled, NewEnrollment, StoredKey


def _campaign(row: Mapping[Any, Any]) -> Campaign:
    return Campaign(
        id=row["id"],
        name=row["name"],
        description=row["description"],
        type=row["type"],
        status=CampaignStatus(row["status"]),
        start_date=row["start_date"],
        end_date=row["end_date"],
        max_participants=row["max_participants"],
        current_participants=row["current_participants"],
        terms=CampaignTerms(
            discount_percentage=row["discount_percentage"],
            min_topup_amount=row["min_topup_amount"],
            max_discount_amount=row["max_discount_amount"],
            voucher_validity_days=row["voucher_validity_days"],
        ),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _participation(row: Mapping[Any, Any]) -> Participation:
    return Participation(
        id=row["id"],
        user_id=row["user_id"],
        campaign_id=row["campaign_id"],
        participation_order=row["participation_order"],
        status=ParticipationStatus(row["status"]),
        first_login_at=row["first_login_at"],
        voucher_issued_at=row["voucher_issued_at"],
        voucher_used_at=row["voucher_used_at"],
        created_at=row["created_at"],
    )


def _voucher(row: Mapping[Any, Any]) -> Voucher:
    return Voucher(
        id=row["id"],
        code=row["code"],
        user_promotion_id=row["user_promotion_id"],
        user_id=row["user_id"],
        type=row["type"],
        status=VoucherStatus(row["status"]),
        discount_percentage=row["discount_percentage"],
        min_topup_amount=row["min_topup_amount"],
        max_discount_amount=row["max_discount_amount"],
        issued_at=row["issued_at"],
        expires_at=row["expires_at"],
        used_at=row["used_at"],
        used_amount=row["used_amount"],
        discount_amount=row["discount_amount"],
        transaction_reference=row["transaction_reference"],
        reserved_until=row["reserved_until"],
    )


_NEWEST_FIRST = (campaigns.c.created_at.desc(), campaigns.c.id.desc())


class CampaignRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(self, campaign: NewCampaign) -> Campaign:
        terms = campaign.terms
        statement = (
            sa.insert(campaigns)
            .values(
                name=campaign.name,
                description=campaign.description,
                type=campaign.type,
                status=CampaignStatus.ACTIVE.value,
                start_date=campaign.start_date,
                end_date=campaign.end_date,
                max_participants=campaign.max_participants,
                discount_percentage=terms.discount_percentage,
                min_topup_amount=terms.min_topup_amount,
                max_discount_amount=terms.max_discount_amount,
                voucher_validity_days=terms.voucher_validity_days,
            )
            .returning(*campaigns.c)
        )
        created = _campaign((await self._session.execute(statement)).mappings().one())
        await self._record_status(created.id, CampaignStatus.ACTIVE, created.created_at)
        return created

    async def _record_status(self, campaign_id: int, status: CampaignStatus, at: datetime) -> None:
        """History of admin-set statuses: a late first-login event is decided by the
        status its login time saw."""
        await self._session.execute(
            sa.insert(campaign_status_changes).values(
                campaign_id=campaign_id, status=status.value, changed_at=at
            )
        )

    async def get(self, campaign_id: int, *, for_update: bool = False) -> Campaign | None:
        statement = sa.select(campaigns).where(campaigns.c.id == campaign_id)
        if for_update:
            statement = statement.with_for_update()
        row = (await self._session.execute(statement)).mappings().first()
        return _campaign(row) if row is not None else None

    async def list_with_status(self, status: CampaignStatus) -> list[Campaign]:
        statement = (
            sa.select(campaigns).where(campaigns.c.status == status.value).order_by(*_NEWEST_FIRST)
        )
        return [_campaign(row) for row in (await self._session.execute(statement)).mappings()]

    async def set_status(self, campaign_id: int, status: CampaignStatus, now: datetime) -> Campaign:
        statement = (
            sa.update(campaigns)
            .where(campaigns.c.id == campaign_id)
            .values(status=status.value, updated_at=now)
            .returning(*campaigns.c)
        )
        return _campaign((await self._session.execute(statement)).mappings().one())

    async def expire_ended(self, now: datetime, campaign_id: int | None = None) -> None:
        """Store ``expired`` on campaigns whose end date has passed (all, or just one)."""
        statement = sa.update(campaigns).where(
            campaigns.c.status.in_([status.value for status in EXPIRABLE_STATUSES]),
            campaigns.c.end_date <= now,
        )
        if campaign_id is not None:
            statement = statement.where(campaigns.c.id == campaign_id)
        await self._session.execute(
            statement.values(status=CampaignStatus.EXPIRED.value, updated_at=now)
        )


class ParticipationRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def list_for_user(self, user_id: int) -> list[tuple[Participation, Campaign]]:
        """The user's participations with their campaigns, newest first."""
        statement = (
            sa.select(
                user_promotions, *[column.label(f"c_{column.name}") for column in campaigns.c]
            )
            .join(campaigns, campaigns.c.id == user_promotions.c.campaign_id)
            .where(user_promotions.c.user_id == user_id)
            .order_by(user_promotions.c.created_at.desc(), user_promotions.c.id.desc())
        )
        pairs = []
        for row in (await self._session.execute(statement)).mappings():
            campaign_row: dict[str, Any] = {
                column.name: row[f"c_{column.name}"] for column in campaigns.c
            }
            pairs.append((_participation(row), _campaign(campaign_row)))
        return pairs

    async def mark_voucher_used(self, participation_id: int, used_at: datetime) -> None:
        await self._session.execute(
            sa.update(user_promotions)
            .where(user_promotions.c.id == participation_id)
            .values(
                status=ParticipationStatus.VOUCHER_USED.value,
                voucher_used_at=used_at,
                updated_at=used_at,
            )
        )


class VoucherRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(self, voucher: NewVoucher) -> Voucher | None:
        """Insert the voucher; ``None`` if its code is already taken (caller draws again)."""
        terms = voucher.terms
        statement = (
            pg_insert(vouchers)
            .values(
                code=voucher.code,
                user_promotion_id=voucher.user_promotion_id,
                user_id=voucher.user_id,
                type=DISCOUNT_VOUCHER,
                status=VoucherStatus.ACTIVE.value,
                discount_percentage=terms.discount_percentage,
                min_topup_amount=terms.min_topup_amount,
                max_discount_amount=terms.max_discount_amount,
                issued_at=voucher.issued_at,
                expires_at=voucher.expires_at,
                created_at=voucher.issued_at,
                updated_at=voucher.issued_at,
            )
            .on_conflict_do_nothing(index_elements=[vouchers.c.code])
            .returning(*vouchers.c)
        )
        row = (await self._session.execute(statement)).mappings().first()
        return _voucher(row) if row is not None else None

    async def get_by_code(self, code: str, *, for_update: bool = False) -> Voucher | None:
        statement = sa.select(vouchers).where(vouchers.c.code == code)
        if for_update:
            # Concurrent top-ups with one voucher queue here; each then sees the committed
            # status of the one before it.
            statement = statement.with_for_update()
        row = (await self._session.execute(statement)).mappings().first()
        return _voucher(row) if row is not None else None

    async def list_for_user(self, user_id: int) -> list[Voucher]:
        statement = (
            sa.select(vouchers)
            .where(vouchers.c.user_id == user_id)
            .order_by(vouchers.c.issued_at.desc(), vouchers.c.id.desc())
        )
        return [_voucher(row) for row in (await self._session.execute(statement)).mappings()]

    async def list_for_participations(self, participation_ids: Sequence[int]) -> list[Voucher]:
        if not participation_ids:
            return []
        statement = (
            sa.select(vouchers)
            .where(vouchers.c.user_promotion_id.in_(participation_ids))
            .order_by(vouchers.c.issued_at.desc(), vouchers.c.id.desc())
        )
        return [_voucher(row) for row in (await self._session.execute(statement)).mappings()]

    async def expire_overdue(
        self, now: datetime, *, user_id: int | None = None, code: str | None = None
    ) -> None:
        """Store ``expired`` on active vouchers past their expiry (of one user or one code),
        and on the participations they belong to (one statement)."""
        expire = sa.update(vouchers).where(
            vouchers.c.status == VoucherStatus.ACTIVE.value, vouchers.c.expires_at <= now
        )
        if user_id is not None:
            expire = expire.where(vouchers.c.user_id == user_id)
        if code is not None:
            expire = expire.where(vouchers.c.code == code)
        expired = (
            expire.values(status=VoucherStatus.EXPIRED.value, updated_at=now)
            .returning(vouchers.c.user_promotion_id)
            .cte("expired")
        )
        statement = (
            sa.update(user_promotions)
            .where(
                user_promotions.c.id.in_(sa.select(expired.c.user_promotion_id)),
                user_promotions.c.status == ParticipationStatus.VOUCHER_ISSUED.value,
            )
            .values(status=ParticipationStatus.EXPIRED.value, updated_at=now)
            .add_cte(expired)
        )
        await self._session.execute(statement)

    async def reserve(self, voucher_id: int, *, until: datetime, now: datetime) -> None:
        """Hold the (locked, active) voucher for a pending top-up until ``until``."""
        await self._session.execute(
            sa.update(vouchers)
            .where(vouchers.c.id == voucher_id, vouchers.c.status == VoucherStatus.ACTIVE.value)
            .values(status=VoucherStatus.RESERVED.value, reserved_until=until, updated_at=now)
        )

    async def release(self, voucher_id: int, now: datetime) -> None:
        """Make a reserved voucher active again (its top-up was not charged)."""
        await self._session.execute(
            sa.update(vouchers)
            .where(vouchers.c.id == voucher_id, vouchers.c.status == VoucherStatus.RESERVED.value)
            .values(status=VoucherStatus.ACTIVE.value, reserved_until=None, updated_at=now)
        )

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
        row = (
            (
                await self._session.execute(
                    sa.update(vouchers)
                    .where(vouchers.c.id == voucher_id)
                    .values(
                        status=VoucherStatus.USED.value,
                        reserved_until=None,
                        used_at=used_at,
                        used_amount=used_amount,
                        discount_amount=discount_amount,
                        transaction_reference=transaction_reference,
                        updated_at=used_at,
                    )
                    .returning(*vouchers.c)
                )
            )
            .mappings()
            .one()
        )
        return _voucher(row)


_PARTICIPATION_CONSTRAINT = "uq_user_promotions_user_campaign"

# One statement for a whole batch, run while the batch holds its campaigns' row locks:
# the slot counters move from ``before`` to ``after`` (decided by domain.enrollment.
# decide_batch from the values read under those locks; the ``before`` check makes a
# counter that moved anyway update nothing, so nothing is inserted either), then the
# participations with their orders, then one voucher each on the campaign's terms.
# clock_timestamp() is read once the locks are held, so issued_at is the moment the slots
# were won (expires_at mirrors domain.vouchers.voucher_expiry).
_RESERVE_AND_ENROLL = sa.text(
    """
WITH slot AS (
    UPDATE promotion_campaigns AS c
    SET current_participants = s.after,
        status = CASE WHEN c.status = 'active' AND s.after >= c.max_participants
                      THEN 'full' ELSE c.status END,
        updated_at = clock_timestamp()
    FROM unnest(CAST(:campaign_ids AS bigint[]), CAST(:befores AS integer[]),
                CAST(:afters AS integer[])) AS s(id, before, after)
    WHERE c.id = s.id AND c.current_participants = s.before
    RETURNING c.*
), new AS (
    SELECT *
    FROM unnest(CAST(:user_ids AS bigint[]), CAST(:for_campaigns AS bigint[]),
                CAST(:orders AS integer[]), CAST(:login_ats AS timestamptz[]),
                CAST(:codes AS text[])) AS n(user_id, campaign_id, participation_order,
                                             login_at, code)
), participation AS (
    INSERT INTO user_promotions (user_id, campaign_id, participation_order, status,
                                 first_login_at, voucher_issued_at, created_at, updated_at)
    SELECT new.user_id, new.campaign_id, new.participation_order, 'voucher_issued',
           new.login_at, slot.updated_at, slot.updated_at, slot.updated_at
    FROM new JOIN slot ON slot.id = new.campaign_id
    ORDER BY new.campaign_id, new.participation_order
    RETURNING id, user_id, campaign_id, participation_order
), voucher AS (
    INSERT INTO vouchers (code, user_promotion_id, user_id, type, status, discount_percentage,
                          min_topup_amount, max_discount_amount, issued_at, expires_at,
                          created_at, updated_at)
    SELECT new.code, participation.id, new.user_id, 'discount', 'active',
           slot.discount_percentage, slot.min_topup_amount, slot.max_discount_amount,
           slot.updated_at, slot.updated_at + make_interval(days => slot.voucher_validity_days),
           slot.updated_at, slot.updated_at
    FROM new
    JOIN participation ON participation.user_id = new.user_id
                      AND participation.campaign_id = new.campaign_id
    JOIN slot ON slot.id = new.campaign_id
    ORDER BY participation.id
    ON CONFLICT (code) DO NOTHING
    RETURNING id, user_promotion_id, code, expires_at
)
SELECT slot.*, participation.id AS p_id, participation.user_id AS p_user_id,
       participation.participation_order AS p_order, voucher.id AS v_id,
       voucher.code AS v_code, voucher.expires_at AS v_expires_at
FROM participation
JOIN slot ON slot.id = participation.campaign_id
LEFT JOIN voucher ON voucher.user_promotion_id = participation.id
ORDER BY participation.id
"""
)

_RECORD_DECISIONS = sa.text(
    """
INSERT INTO first_login_decisions (user_id, event_id, login_at, decided_at, result,
                                   campaign_id, reason)
SELECT * FROM unnest(CAST(:user_ids AS bigint[]), CAST(:event_ids AS uuid[]),
                     CAST(:login_ats AS timestamptz[]), CAST(:decided_ats AS timestamptz[]),
                     CAST(:results AS text[]), CAST(:campaign_ids AS bigint[]),
                     CAST(:reasons AS text[]))
ORDER BY 1
ON CONFLICT (user_id) DO NOTHING
"""
)


class EnrollmentRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def campaign_for_login(
        self,
        campaign_type: str,
        at: datetime,
        statuses: Sequence[CampaignStatus],
        *,
        user_id: int,
    ) -> tuple[Campaign, Participation | None] | None:
        """The newest campaign of ``campaign_type`` in one of ``statuses`` (earlier ones
        preferred) whose window contains ``at``, with ``user_id``'s participation in it if
        there is one; ``None`` if no campaign qualifies. One round trip."""
        preference = sa.case(
            {status.value: rank for rank, status in enumerate(statuses)},
            value=campaigns.c.status,
        )
        participation_columns = [column.label(f"p_{column.name}") for column in user_promotions.c]
        statement = (
            sa.select(campaigns, *participation_columns)
            .outerjoin(
                user_promotions,
                sa.and_(
                    user_promotions.c.campaign_id == campaigns.c.id,
                    user_promotions.c.user_id == user_id,
                ),
            )
            .where(
                campaigns.c.type == campaign_type,
                campaigns.c.status.in_([status.value for status in statuses]),
                campaigns.c.start_date <= at,
                campaigns.c.end_date > at,
            )
            .order_by(preference, *_NEWEST_FIRST)
            .limit(1)
        )
        row = (await self._session.execute(statement)).mappings().first()
        if row is None:
            return None
        participation = None
        if row["p_id"] is not None:
            participation = _participation(
                {column.name: row[f"p_{column.name}"] for column in user_promotions.c}
            )
        return _campaign(row), participation

    async def latest_participation(
        self, campaign_type: str, *, user_id: int
    ) -> tuple[Campaign, Participation] | None:
        """The user's newest participation in a campaign of ``campaign_type``."""
        statement = (
            sa.select(campaigns, *[c.label(f"p_{c.name}") for c in user_promotions.c])
            .join(user_promotions, user_promotions.c.campaign_id == campaigns.c.id)
            .where(campaigns.c.type == campaign_type, user_promotions.c.user_id == user_id)
            .order_by(user_promotions.c.created_at.desc(), user_promotions.c.id.desc())
            .limit(1)
        )
        row = (await self._session.execute(statement)).mappings().first()
        if row is None:
            return None
        participation = _participation(
            {column.name: row[f"p_{column.name}"] for column in user_promotions.c}
        )
        return _campaign(row), participation

    async def decision_for(self, user_id: int) -> FirstLoginDecision | None:
        row = (
            (
                await self._session.execute(
                    sa.select(first_login_decisions).where(
                        first_login_decisions.c.user_id == user_id
                    )
                )
            )
            .mappings()
            .first()
        )
        if row is None:
            return None
        return FirstLoginDecision(
            user_id=row["user_id"],
            event_id=row["event_id"],
            login_at=row["login_at"],
            decided_at=row["decided_at"],
            result=EnrollmentResult(row["result"]),
            campaign_id=row["campaign_id"],
            reason=row["reason"],
        )

    async def candidate_campaigns(
        self, campaign_type: str, earliest: datetime, latest: datetime
    ) -> list[CampaignHistory]:
        """The campaigns of ``campaign_type`` whose window overlaps ``[earliest, latest]``, each
        with its status history (oldest first): everything needed to tell, for any login in
        that span, which campaign was running (``domain.enrollment.campaign_at_login``). One
        round trip."""
        history = campaign_status_changes
        statement = (
            sa.select(
                campaigns,
                history.c.changed_at.label("h_changed_at"),
                history.c.status.label("h_status"),
            )
            .outerjoin(history, history.c.campaign_id == campaigns.c.id)
            .where(
                campaigns.c.type == campaign_type,
                campaigns.c.start_date <= latest,
                campaigns.c.end_date > earliest,
            )
            .order_by(campaigns.c.id, history.c.changed_at, history.c.id)
        )
        found: dict[int, tuple[Campaign, list[tuple[datetime, CampaignStatus]]]] = {}
        for row in (await self._session.execute(statement)).mappings():
            if row["id"] not in found:
                found[row["id"]] = (_campaign(row), [])
            if row["h_changed_at"] is not None:
                found[row["id"]][1].append((row["h_changed_at"], CampaignStatus(row["h_status"])))
        return [CampaignHistory(campaign, tuple(changes)) for campaign, changes in found.values()]

    async def lock_campaigns(self, campaign_ids: Sequence[int]) -> dict[int, Campaign]:
        """Lock the campaigns' rows (in id order, so batches never deadlock on them) and read
        them as they are once locked: their slot counters cannot move until this
        transaction ends."""
        if not campaign_ids:
            return {}
        statement = (
            sa.select(campaigns)
            .where(campaigns.c.id.in_(sorted(set(campaign_ids))))
            .order_by(campaigns.c.id)
            .with_for_update()
        )
        rows = (await self._session.execute(statement)).mappings()
        return {row["id"]: _campaign(row) for row in rows}

    async def participations_of(
        self, campaign_ids: Sequence[int], user_ids: Sequence[int]
    ) -> list[Participation]:
        """The participations of any of ``user_ids`` in any of ``campaign_ids``."""
        if not campaign_ids or not user_ids:
            return []
        statement = sa.select(user_promotions).where(
            user_promotions.c.campaign_id.in_(sorted(set(campaign_ids))),
            user_promotions.c.user_id.in_(sorted(set(user_ids))),
        )
        return [_participation(row) for row in (await self._session.execute(statement)).mappings()]

    async def reserve_and_enroll(
        self, reservations: Sequence[SlotReservation], enrollments: Sequence[NewEnrollment]
    ) -> list[Enrolled]:
        """Move each campaign's slot counter as reserved and record every enrollment (its
        participation in its order, and its voucher) in ONE statement; the result in the
        order of ``enrollments``.

        The caller holds the campaigns' row locks and decided the orders from what it read
        under them; a counter that is not at ``before`` any more (a bug, never a race) makes
        this raise instead of enrolling anyone. :class:`ParticipationConflict` if a user
        was enrolled concurrently all the same (the whole transaction must be retried).
        """
        if not enrollments:
            return []
        try:
            result = await self._session.execute(
                _RESERVE_AND_ENROLL,
                {
                    "campaign_ids": [r.campaign_id for r in reservations],
                    "befores": [r.before for r in reservations],
                    "afters": [r.after for r in reservations],
                    "user_ids": [e.user_id for e in enrollments],
                    "for_campaigns": [e.campaign_id for e in enrollments],
                    "orders": [e.participation_order for e in enrollments],
                    "login_ats": [e.login_at for e in enrollments],
                    "codes": [e.voucher_code for e in enrollments],
                },
            )
        except sa.exc.IntegrityError as error:
            diagnostics = getattr(error.orig, "diag", None)
            if getattr(diagnostics, "constraint_name", None) == _PARTICIPATION_CONSTRAINT:
                raise ParticipationConflict from error
            raise
        rows = {(row["p_user_id"], row["id"]): row for row in result.mappings()}
        if len(rows) != len(enrollments):
            raise RuntimeError(
                f"{len(enrollments)} enrollments reserved but {len(rows)} recorded:"
                " a slot counter moved while its row was locked"
            )
        enrolled = []
        for new in enrollments:
            row = rows[(new.user_id, new.campaign_id)]
            won_at: datetime = row["updated_at"]
            campaign = _campaign(row)
            participation = Participation(
                id=row["p_id"],
                user_id=new.user_id,
                campaign_id=new.campaign_id,
                participation_order=row["p_order"],
                status=ParticipationStatus.VOUCHER_ISSUED,
                first_login_at=new.login_at,
                voucher_issued_at=won_at,
                voucher_used_at=None,
                created_at=won_at,
            )
            voucher = None
            if row["v_id"] is not None:
                terms = campaign.terms
                voucher = Voucher(
                    id=row["v_id"],
                    code=row["v_code"],
                    user_promotion_id=participation.id,
                    user_id=new.user_id,
                    type=DISCOUNT_VOUCHER,
                    status=VoucherStatus.ACTIVE,
                    discount_percentage=terms.discount_percentage,
                    min_topup_amount=terms.min_topup_amount,
                    max_discount_amount=terms.max_discount_amount,
                    issued_at=won_at,
                    expires_at=row["v_expires_at"],
                    used_at=None,
                    used_amount=None,
                    discount_amount=None,
                    transaction_reference=None,
                )
            enrolled.append(Enrolled(campaign, participation, voucher))
        return enrolled

    async def record_decisions(self, decisions: Sequence[FirstLoginDecision]) -> None:
        """Keep what each user's first-login event decided, and why (per user the first one
        wins: an earlier event's, or the earliest given here). One statement."""
        first: dict[int, FirstLoginDecision] = {}
        for decision in decisions:
            first.setdefault(decision.user_id, decision)
        if not first:
            return
        kept = list(first.values())
        await self._session.execute(
            _RECORD_DECISIONS,
            {
                "user_ids": [d.user_id for d in kept],
                "event_ids": [d.event_id for d in kept],
                "login_ats": [d.login_at for d in kept],
                "decided_ats": [d.decided_at for d in kept],
                "results": [d.result.value for d in kept],
                "campaign_ids": [d.campaign_id for d in kept],
                "reasons": [d.reason for d in kept],
            },
        )


def _topup(row: Mapping[Any, Any]) -> TopupRecord:
    return TopupRecord(
        transaction_id=row["transaction_id"],
        user_id=row["user_id"],
        phone_number=row["phone_number"],
        original_amount=row["original_amount"],
        discount_amount=row["discount_amount"],
        final_amount=row["final_amount"],
        voucher_id=row["voucher_id"],
        payment_method=row["payment_method"],
        status=TopupStatus(row["status"]),
        created_at=row["created_at"],
        voucher_code=row["voucher_code"],
        idempotency_key=row["idempotency_key"],
    )


class TopupRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(self, record: TopupRecord) -> None:
        await self._session.execute(
            sa.insert(topups).values(
                transaction_id=record.transaction_id,
                user_id=record.user_id,
                phone_number=record.phone_number,
                original_amount=record.original_amount,
                discount_amount=record.discount_amount,
                final_amount=record.final_amount,
                voucher_id=record.voucher_id,
                voucher_code=record.voucher_code,
                idempotency_key=record.idempotency_key,
                payment_method=record.payment_method,
                status=record.status.value,
                created_at=record.created_at,
                updated_at=record.created_at,
            )
        )

    async def get(self, transaction_id: str, *, for_update: bool = False) -> TopupRecord | None:
        statement = sa.select(topups).where(topups.c.transaction_id == transaction_id)
        if for_update:
            # Settling queues here: a request and the reconciler never settle one top-up twice.
            statement = statement.with_for_update()
        row = (await self._session.execute(statement)).mappings().first()
        return _topup(row) if row is not None else None

    async def set_status(self, transaction_id: str, status: TopupStatus, now: datetime) -> None:
        await self._session.execute(
            sa.update(topups)
            .where(topups.c.transaction_id == transaction_id)
            .values(status=status.value, updated_at=now)
        )

    async def pending_created_before(self, instant: datetime, *, limit: int) -> list[str]:
        """Transaction ids of pending top-ups created before ``instant``, oldest first."""
        statement = (
            sa.select(topups.c.transaction_id)
            .where(topups.c.status == TopupStatus.PENDING.value, topups.c.created_at <= instant)
            .order_by(topups.c.created_at)
            .limit(limit)
        )
        return list((await self._session.execute(statement)).scalars())


class IdempotencyKeyRepository:
    """Top-up idempotency keys, per user: the first request's fingerprint and response."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def claim(self, user_id: int, key: str, fingerprint: str, transaction_id: str) -> bool:
        """Reserve ``key`` for the top-up ``transaction_id``; False if it is already taken.

        A concurrent request with the same key blocks on the primary key until this
        transaction ends, then finds the key (pending or answered). So one key never runs
        two top-ups.
        """
        statement = (
            pg_insert(idempotency_keys)
            .values(
                user_id=user_id,
                key=key,
                request_fingerprint=fingerprint,
                transaction_id=transaction_id,
            )
            .on_conflict_do_nothing(
                index_elements=[idempotency_keys.c.user_id, idempotency_keys.c.key]
            )
            .returning(idempotency_keys.c.key)
        )
        return (await self._session.execute(statement)).first() is not None

    async def get(self, user_id: int, key: str) -> StoredKey | None:
        """What a committed key holds, or ``None``."""
        statement = sa.select(
            idempotency_keys.c.request_fingerprint,
            idempotency_keys.c.response,
            idempotency_keys.c.transaction_id,
        ).where(idempotency_keys.c.user_id == user_id, idempotency_keys.c.key == key)
        row = (await self._session.execute(statement)).first()
        if row is None:
            return None
        receipt = decode_receipt(row[1]) if row[1] is not None else None
        return StoredKey(row[0], receipt, row[2])

    async def delete_created_before(self, age_seconds: float, *, limit: int) -> int:
        """Delete up to ``limit`` keys older than ``age_seconds``; how many went."""
        expired = (
            sa.select(idempotency_keys.c.user_id, idempotency_keys.c.key)
            .where(
                idempotency_keys.c.created_at
                < sa.func.now()
                - sa.func.make_interval(0, 0, 0, 0, 0, 0, sa.bindparam("age", type_=sa.Float))
            )
            .limit(limit)
        )
        statement = sa.delete(idempotency_keys).where(
            sa.tuple_(idempotency_keys.c.user_id, idempotency_keys.c.key).in_(expired)
        )
        result = await self._session.execute(statement, {"age": age_seconds})
        return int(cast(CursorResult[Any], result).rowcount)

    async def forget(self, user_id: int, key: str) -> None:
        """Free the key: its top-up failed, so a retry may try again."""
        await self._session.execute(
            sa.delete(idempotency_keys).where(
                idempotency_keys.c.user_id == user_id, idempotency_keys.c.key == key
            )
        )

    async def store_receipt(self, user_id: int, key: str, receipt: TopupReceipt) -> None:
        """Kept as the wire answer's bytes (``TopupResponse``), exactly what a retry gets."""
        await self._session.execute(
            sa.update(idempotency_keys)
            .where(idempotency_keys.c.user_id == user_id, idempotency_keys.c.key == key)
            .values(response=encode_receipt(receipt))
        )
