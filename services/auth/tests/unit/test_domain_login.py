"""How a login's ``account`` is compared and throttled (pure functions)."""

from __future__ import annotations

import pytest
from cake_auth.domain.login import login_account


def test_account_forms() -> None:
    account = login_account("  Alice_1 ")
    assert account.lowered == "alice_1"
    assert account.can_exist


@pytest.mark.parametrize(
    "spellings",
    [
        ("Alice_1", "alice_1", "ALICE_1", " alice_1 "),
        ("Alice@Example.com", "alice@example.com", "ALICE@EXAMPLE.COM"),
        ("+84 912-345-678", "+84912345678", "+84-912-345 678"),
    ],
)
def test_one_throttle_key_per_account_however_spelled(spellings: tuple[str, ...]) -> None:
    keys = {login_account(spelling).throttle_key for spelling in spellings}
    assert len(keys) == 1


def test_emails_with_dashes_are_not_merged_with_other_accounts() -> None:
    # Separators are only dropped from phone-like accounts.
    assert (
        login_account("a-b@example.com").throttle_key
        != login_account("ab@example.com").throttle_key
    )


def test_phone_forms() -> None:
    assert login_account("+84 912-345-678").phone == "+84912345678"


def test_account_with_nul_cannot_exist() -> None:
    assert not login_account("alice\x00").can_exist
