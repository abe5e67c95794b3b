"""Fault rules of the bank simulator: parsing the per-request header, choosing a rule."""

from __future__ import annotations

from decimal import Decimal

import pytest
from cake_payments.domain.ledger import Fault, FaultRule, fault_for, parse_fault
from cake_payments.settings import PaymentsSettings


def test_header_names_every_fault() -> None:
    assert parse_fault("hang") == FaultRule(Fault.HANG)
    assert parse_fault("crash-after-charge") == FaultRule(Fault.CRASH_AFTER_CHARGE)
    assert parse_fault(" Delay=2000 ") == FaultRule(Fault.DELAY, delay_ms=2000)


@pytest.mark.parametrize("text", ["", "explode", "delay", "delay=-1", "delay=x", "hang=3"])
def test_bad_header_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_fault(text)


def test_first_matching_rule_applies() -> None:
    rules = [FaultRule(Fault.DECLINE, amount=Decimal("13.13")), FaultRule(Fault.DELAY, 5)]
    assert fault_for(rules, Decimal("13.13")) == rules[0]
    assert fault_for(rules, Decimal("10")) == rules[1]
    assert fault_for([], Decimal("10")) is None


def test_run_wide_fault_from_settings() -> None:
    settings = PaymentsSettings(
        database_url="postgresql+psycopg://u:p@h/db", fault="delay", fault_delay_ms=2000
    )
    assert settings.fault_rules() == [FaultRule(Fault.DELAY, delay_ms=2000)]
    assert PaymentsSettings(database_url="postgresql+psycopg://u:p@h/db").fault_rules() == []
