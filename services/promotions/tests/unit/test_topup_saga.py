"""The top-up saga's state machine: pure transitions, and a model of a request racing the
reconciler against a bank that may charge, decline, hang or answer late."""

from __future__ import annotations

from decimal import Decimal

import pytest
from cake_promotions.domain.topups import (
    PaymentOutcome,
    SagaInvariantBroken,
    SagaStep,
    TopupStatus,
    next_step,
    success_message,
)
from hypothesis import given, settings
from hypothesis import strategies as st

PENDING, SUCCEEDED, FAILED = TopupStatus.PENDING, TopupStatus.SUCCEEDED, TopupStatus.FAILED
CHARGED, NOT_CHARGED, UNKNOWN = (
    PaymentOutcome.CHARGED,
    PaymentOutcome.NOT_CHARGED,
    PaymentOutcome.UNKNOWN,
)


@pytest.mark.parametrize(
    ("status", "outcome", "step"),
    [
        (PENDING, CHARGED, SagaStep.CONFIRM),
        (PENDING, NOT_CHARGED, SagaStep.COMPENSATE),
        (PENDING, UNKNOWN, SagaStep.WAIT),
        (SUCCEEDED, CHARGED, SagaStep.NOTHING),
        (FAILED, NOT_CHARGED, SagaStep.NOTHING),
        (SUCCEEDED, UNKNOWN, SagaStep.NOTHING),
        (FAILED, UNKNOWN, SagaStep.NOTHING),
    ],
)
def test_transitions(status: TopupStatus, outcome: PaymentOutcome, step: SagaStep) -> None:
    assert next_step(status, outcome) is step


@pytest.mark.parametrize(("status", "outcome"), [(SUCCEEDED, NOT_CHARGED), (FAILED, CHARGED)])
def test_a_contradiction_is_never_applied(status: TopupStatus, outcome: PaymentOutcome) -> None:
    with pytest.raises(SagaInvariantBroken):
        next_step(status, outcome)


def test_success_message_says_what_was_saved_as_cake_prints_numbers() -> None:
    assert success_message(Decimal("30.00")) == (
        "Top-up successful! You saved 30 with your voucher."
    )
    assert success_message(Decimal("15000.15")) == (
        "Top-up successful! You saved 15000.15 with your voucher."
    )
    assert success_message(Decimal("0.50")) == (
        "Top-up successful! You saved 0.5 with your voucher."
    )
    assert success_message(Decimal("0.00")) == "Top-up successful!"


class BankModel:
    """The simulator's ledger rules: one entry per id, a void fences a late charge."""

    def __init__(self) -> None:
        self.entries: dict[str, str] = {}
        self.debits = 0

    def charge(self, txn: str, decline: bool) -> PaymentOutcome:
        if txn not in self.entries:
            self.entries[txn] = "declined" if decline else "charged"
            self.debits += 0 if decline else 1
        return CHARGED if self.entries[txn] == "charged" else NOT_CHARGED

    def settle_status(self, txn: str) -> PaymentOutcome:
        self.entries.setdefault(txn, "voided")
        return CHARGED if self.entries[txn] == "charged" else NOT_CHARGED


def apply(status: TopupStatus, outcome: PaymentOutcome) -> TopupStatus:
    step = next_step(status, outcome)
    if step is SagaStep.CONFIRM:
        return SUCCEEDED
    if step is SagaStep.COMPENSATE:
        return FAILED
    return status


# One top-up: what the bank does with the request's charge, whether the request hears the
# answer, and when (in the sequence of events) the reconciler asks.
events = st.lists(
    st.sampled_from(["charge", "charge_declined", "charge_lost", "reconcile", "retry_charge"]),
    min_size=1,
    max_size=8,
)


@settings(deadline=None)
@given(events)
def test_any_interleaving_keeps_the_invariants(steps: list[str]) -> None:
    bank = BankModel()
    status = PENDING
    for step in steps:
        if step == "reconcile":
            status = apply(status, bank.settle_status("TXN"))
        elif step == "charge_lost":  # charged (or not), but nobody heard the answer
            bank.charge("TXN", decline=False)
            status = apply(status, UNKNOWN)
        else:
            status = apply(status, bank.charge("TXN", decline=step == "charge_declined"))
    status = apply(status, bank.settle_status("TXN"))  # the reconciler's last round
    assert bank.debits <= 1  # never two charges for one top-up
    assert status is not PENDING  # never left pending once the bank can be asked
    assert (status is SUCCEEDED) == (bank.debits == 1)  # never a charge without a success
