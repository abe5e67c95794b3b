"""The ledger on PostgreSQL; every statement runs in the caller's transaction."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from cake_payments.adapters.tables import ledger
from cake_payments.domain.ledger import ChargeOrder, ChargeStatus, LedgerEntry, LedgerStats


def _entry(row: Mapping[Any, Any]) -> LedgerEntry:
    return LedgerEntry(
        transaction_id=row["transaction_id"],
        status=ChargeStatus(row["status"]),
        amount=row["amount"],
        reason=row["reason"],
        recorded_at=row["recorded_at"],
    )


class LedgerRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def record(
        self, order: ChargeOrder, status: ChargeStatus, reason: str | None = None
    ) -> LedgerEntry | None:
        """Write the entry of ``order``; ``None`` if its transaction id already has one."""
        statement = (
            pg_insert(ledger)
            .values(
                transaction_id=order.transaction_id,
                status=status.value,
                user_id=order.user_id,
                amount=order.amount,
                payment_method=order.payment_method,
                phone_number=order.phone_number,
                reason=reason,
            )
            .on_conflict_do_nothing(index_elements=[ledger.c.transaction_id])
            .returning(*ledger.c)
        )
        row = (await self._session.execute(statement)).mappings().first()
        return _entry(row) if row is not None else None

    async def void(self, transaction_id: str) -> LedgerEntry | None:
        """Void an id that has no entry; ``None`` if it has one."""
        statement = (
            pg_insert(ledger)
            .values(transaction_id=transaction_id, status=ChargeStatus.VOIDED.value)
            .on_conflict_do_nothing(index_elements=[ledger.c.transaction_id])
            .returning(*ledger.c)
        )
        row = (await self._session.execute(statement)).mappings().first()
        return _entry(row) if row is not None else None

    async def get(self, transaction_id: str) -> LedgerEntry | None:
        statement = sa.select(ledger).where(ledger.c.transaction_id == transaction_id)
        row = (await self._session.execute(statement)).mappings().first()
        return _entry(row) if row is not None else None

    async def stats(self) -> LedgerStats:
        statement = sa.select(ledger.c.status, sa.func.count()).group_by(ledger.c.status)
        counts = {status: count for status, count in (await self._session.execute(statement))}
        return LedgerStats(
            charged=counts.get(ChargeStatus.CHARGED.value, 0),
            declined=counts.get(ChargeStatus.DECLINED.value, 0),
            voided=counts.get(ChargeStatus.VOIDED.value, 0),
        )
