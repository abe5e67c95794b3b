"""Ledger entries and fault rules: what the simulated bank records and how it misbehaves."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum


class ChargeStatus(StrEnum):
    CHARGED = "charged"
    DECLINED = "declined"
    VOIDED = "voided"


class Fault(StrEnum):
    DECLINE = "decline"
    ERROR = "error"
    DELAY = "delay"
    HANG = "hang"
    CRASH_AFTER_CHARGE = "crash_after_charge"


@dataclass(frozen=True, slots=True)
class FaultRule:
    """Act out ``fault`` on charges of ``amount`` (``None``: every charge)."""

    fault: Fault
    delay_ms: int = 0
    amount: Decimal | None = None

    def matches(self, amount: Decimal) -> bool:
        return self.amount is None or self.amount == amount


def fault_for(rules: Sequence[FaultRule], amount: Decimal) -> FaultRule | None:
    """The first rule that applies to a charge of ``amount``, or ``None``."""
    return next((rule for rule in rules if rule.matches(amount)), None)


def parse_fault(text: str) -> FaultRule:
    """A per-request fault header: ``decline``, ``error``, ``hang``, ``crash_after_charge``,
    or ``delay=<ms>``; ``ValueError`` for anything else."""
    name, _, argument = text.strip().lower().partition("=")
    fault = Fault(name.replace("-", "_"))
    if fault is Fault.DELAY:
        delay_ms = int(argument)
        if not 0 <= delay_ms <= 600_000:
            raise ValueError("delay must be 0 to 600000 ms")
        return FaultRule(fault, delay_ms=delay_ms)
    if argument:
        raise ValueError(f"{fault.value} takes no argument")
    return FaultRule(fault)


@dataclass(frozen=True, slots=True)
class ChargeOrder:
    """A payment to debit, identified by the caller's transaction id."""

    transaction_id: str
    user_id: int
    amount: Decimal
    payment_method: str
    phone_number: str


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    transaction_id: str
    status: ChargeStatus
    amount: Decimal | None
    reason: str | None
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class ChargeOutcome:
    entry: LedgerEntry
    replayed: bool
    """The entry was there before this call (a retry, or an id voided earlier)."""


@dataclass(frozen=True, slots=True)
class LedgerStats:
    charged: int
    declined: int
    voided: int
