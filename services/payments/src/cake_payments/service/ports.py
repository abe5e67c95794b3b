"""What the use cases need from the outside world; adapters implement these."""

from __future__ import annotations

from typing import Protocol

from cake_common.db import TransactionPort

from cake_payments.domain.ledger import ChargeOrder, ChargeStatus, LedgerEntry, LedgerStats


class LedgerRepository(Protocol):
    async def record(
        self, order: ChargeOrder, status: ChargeStatus, reason: str | None = None
    ) -> LedgerEntry | None:
        """Write the entry of ``order``; ``None`` if its transaction id already has one."""
        ...

    async def void(self, transaction_id: str) -> LedgerEntry | None:
        """Void an id that has no entry; ``None`` if it has one."""
        ...

    async def get(self, transaction_id: str) -> LedgerEntry | None: ...

    async def stats(self) -> LedgerStats: ...


class PaymentsUnitOfWork(TransactionPort, Protocol):
    """One transaction with the ledger on it."""

    @property
    def ledger(self) -> LedgerRepository: ...


class UnitOfWorkFactory(Protocol):
    def __call__(self) -> PaymentsUnitOfWork: ...
