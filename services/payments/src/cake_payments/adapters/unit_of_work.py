"""The bank's unit of work: one transaction with the ledger on it."""

from __future__ import annotations

from cake_common.db import UnitOfWork
from sqlalchemy.ext.asyncio import AsyncSession

from cake_payments.adapters.ledger import LedgerRepository


class SqlPaymentsUnitOfWork(UnitOfWork):
    ledger: LedgerRepository

    def bind_repositories(self, session: AsyncSession) -> None:
        self.ledger = LedgerRepository(session)
