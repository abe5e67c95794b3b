"""The bank's use cases (charge, look up with void, faults) against an in-memory ledger."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Self

import pytest
from cake_common.errors import Unavailable
from cake_payments.domain.ledger import (
    ChargeOrder,
    ChargeStatus,
    Fault,
    FaultRule,
    LedgerEntry,
    LedgerStats,
)
from cake_payments.service.charges import SIMULATED_DECLINE, Bank, FaultSwitch

NOW = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)


@dataclass
class FakeLedger:
    """The ledger table's rule: one entry per transaction id, never replaced."""

    entries: dict[str, LedgerEntry] = field(default_factory=dict)

    async def record(
        self, order: ChargeOrder, status: ChargeStatus, reason: str | None = None
    ) -> LedgerEntry | None:
        if order.transaction_id in self.entries:
            return None
        entry = LedgerEntry(order.transaction_id, status, order.amount, reason, NOW)
        self.entries[order.transaction_id] = entry
        return entry

    async def void(self, transaction_id: str) -> LedgerEntry | None:
        if transaction_id in self.entries:
            return None
        entry = LedgerEntry(transaction_id, ChargeStatus.VOIDED, None, None, NOW)
        self.entries[transaction_id] = entry
        return entry

    async def get(self, transaction_id: str) -> LedgerEntry | None:
        return self.entries.get(transaction_id)

    async def stats(self) -> LedgerStats:
        statuses = [entry.status for entry in self.entries.values()]
        return LedgerStats(
            charged=statuses.count(ChargeStatus.CHARGED),
            declined=statuses.count(ChargeStatus.DECLINED),
            voided=statuses.count(ChargeStatus.VOIDED),
        )


@dataclass
class FakeUnitOfWork:
    ledger: FakeLedger
    commits: list[int]

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def commit(self) -> None:
        self.commits.append(1)


@dataclass
class World:
    ledger: FakeLedger = field(default_factory=FakeLedger)
    commits: list[int] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    faults: FaultSwitch = field(default_factory=FaultSwitch)

    def bank(self) -> Bank:
        return Bank(
            lambda: FakeUnitOfWork(self.ledger, self.commits),
            self.faults,
            lambda: self.crashes.append("crash"),
        )


def order(transaction_id: str = "t-1", amount: str = "80000.00") -> ChargeOrder:
    return ChargeOrder(transaction_id, 7, Decimal(amount), "bank_transfer", "+84901234567")


async def test_a_charge_is_recorded_once_and_a_retry_replays_it() -> None:
    world = World()
    first = await world.bank().charge(order())
    again = await world.bank().charge(order(amount="1.00"))  # same id, other amount
    assert (first.entry.status, first.replayed) == (ChargeStatus.CHARGED, False)
    assert again.replayed and again.entry == first.entry
    assert await world.bank().stats() == LedgerStats(charged=1, declined=0, voided=0)


async def test_looking_up_an_unknown_id_with_void_makes_a_late_charge_impossible() -> None:
    world = World()
    bank = world.bank()
    assert await bank.get_charge("t-9", void_if_absent=False) is None
    voided = await bank.get_charge("t-9", void_if_absent=True)
    assert voided is not None and voided.status is ChargeStatus.VOIDED
    late = await bank.charge(order("t-9"))
    assert late.replayed and late.entry.status is ChargeStatus.VOIDED
    # A charged id stays charged when looked up with void.
    await bank.charge(order("t-1"))
    charged = await bank.get_charge("t-1", void_if_absent=True)
    assert charged is not None and charged.status is ChargeStatus.CHARGED


async def test_faults_decline_error_and_crash_after_charging() -> None:
    world = World(faults=FaultSwitch([FaultRule(Fault.DECLINE, amount=Decimal("13.13"))]))
    bank = world.bank()
    declined = await bank.charge(order("t-1", "13.13"))
    assert (declined.entry.status, declined.entry.reason) == (
        ChargeStatus.DECLINED,
        SIMULATED_DECLINE,
    )
    assert (await bank.charge(order("t-2"))).entry.status is ChargeStatus.CHARGED

    with pytest.raises(Unavailable):
        await bank.charge(order("t-3"), FaultRule(Fault.ERROR))
    assert "t-3" not in world.ledger.entries  # an error charges nothing

    crashed = await bank.charge(order("t-4"), FaultRule(Fault.CRASH_AFTER_CHARGE))
    assert crashed.entry.status is ChargeStatus.CHARGED  # committed before the crash
    assert world.crashes == ["crash"]
