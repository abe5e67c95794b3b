"""Charging and looking up payments, with the faults the simulator is told to act out.

A charge is one short transaction that writes the ledger entry of its transaction id; the
primary key makes a retry find the first entry instead of debiting again, and a void written
first (by :meth:`Bank.get_charge` with ``void_if_absent``) makes a late charge impossible.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from cake_common.errors import Unavailable
from cake_common.logging import get_logger

from cake_payments.domain.ledger import (
    ChargeOrder,
    ChargeOutcome,
    ChargeStatus,
    Fault,
    FaultRule,
    LedgerEntry,
    LedgerStats,
    fault_for,
)
from cake_payments.service.ports import UnitOfWorkFactory

SIMULATED_DECLINE = "declined by the simulated bank"
SIMULATED_ERROR = "Simulated bank error"

ProcessKiller = Callable[[], None]
"""Ends this process at once, as a crash would (SIGKILL in production wiring)."""

_log = get_logger(__name__)


class FaultSwitch:
    """The run-wide fault rules (from settings at start, replaced by the admin call)."""

    def __init__(self, rules: Sequence[FaultRule] = ()) -> None:
        self._rules = tuple(rules)

    @property
    def rules(self) -> tuple[FaultRule, ...]:
        return self._rules

    def replace(self, rules: Sequence[FaultRule]) -> None:
        self._rules = tuple(rules)
        _log.warning("fault rules replaced", rules=[rule.fault.value for rule in rules])


class Bank:
    def __init__(
        self, uow_factory: UnitOfWorkFactory, faults: FaultSwitch, crash: ProcessKiller
    ) -> None:
        self._uow_factory = uow_factory
        self._faults = faults
        self._crash = crash

    async def charge(self, order: ChargeOrder, fault: FaultRule | None = None) -> ChargeOutcome:
        """Debit ``order`` once per transaction id; ``fault`` (a per-request one) overrides
        the run-wide rules."""
        rule = fault or fault_for(self._faults.rules, order.amount)
        if rule is not None:
            _log.info("acting out a fault", fault=rule.fault.value, txn=order.transaction_id)
            if rule.fault is Fault.ERROR:
                raise Unavailable(SIMULATED_ERROR, reason="BANK_ERROR")
            if rule.fault is Fault.HANG:
                # Until the caller's deadline cancels this call; nothing is charged.
                await asyncio.Event().wait()
            if rule.fault is Fault.DELAY:
                await asyncio.sleep(rule.delay_ms / 1000)
        declined = rule is not None and rule.fault is Fault.DECLINE
        status = ChargeStatus.DECLINED if declined else ChargeStatus.CHARGED
        async with self._uow_factory() as uow:
            entry = await uow.ledger.record(order, status, SIMULATED_DECLINE if declined else None)
            replayed = entry is None
            if entry is None:
                entry = await uow.ledger.get(order.transaction_id)
                assert entry is not None  # the conflicting row is committed, never deleted
            await uow.commit()
        if rule is not None and rule.fault is Fault.CRASH_AFTER_CHARGE:
            _log.warning("crashing after the charge (fault)", txn=order.transaction_id)
            self._crash()
        return ChargeOutcome(entry, replayed=replayed)

    async def get_charge(self, transaction_id: str, *, void_if_absent: bool) -> LedgerEntry | None:
        """The ledger's entry for ``transaction_id`` (``None``: none); with
        ``void_if_absent`` an id never charged is voided first, so the answer is final."""
        async with self._uow_factory() as uow:
            entry = await uow.ledger.void(transaction_id) if void_if_absent else None
            if entry is None:
                entry = await uow.ledger.get(transaction_id)
            await uow.commit()
        return entry

    async def stats(self) -> LedgerStats:
        async with self._uow_factory() as uow:
            return await uow.ledger.stats()
