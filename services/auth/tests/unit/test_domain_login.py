"""How a login's ``account`` is compared and throttled (pure functions)."""

from __future__ import annotations

import pytest
from cake_auth.adapters.login_throttle import LocalFailureCounter
from cake_auth.domain.login import (
    DelayPolicy,
    LoginContext,
    ThrottleKeys,
    login_account,
    throttle_keys,
)


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


def test_delays_grow_after_the_free_failures_and_are_capped() -> None:
    policy = DelayPolicy(
        free_failures=3, base_delay_seconds=1, max_delay_seconds=20, window_seconds=900
    )
    assert [policy.delay_after(n) for n in range(9)] == [0, 0, 0, 1, 2, 4, 8, 16, 20]
    assert policy.delay_after(10_000) == 20  # no overflow, still only the cap: no lock-out
    assert policy.wait(4, last_failure_at=100.0, now=101.5) == 0.5
    assert policy.wait(4, last_failure_at=100.0, now=103.0) == 0


def test_throttle_keys_name_the_user_whatever_identifier_was_used() -> None:
    context = LoginContext(client_ip="203.0.113.9")
    by_name = throttle_keys(login_account("Alice_1"), 7, context)
    by_mail = throttle_keys(login_account("alice@example.com"), 7, context)
    assert by_name == by_mail == ThrottleKeys(account="user:7", client_ip="203.0.113.9")
    assert throttle_keys(login_account("Ghost"), None, LoginContext()).account == "name:ghost"


def test_local_fallback_counts_and_forgets_within_bounds() -> None:
    now = [1000.0]
    counter = LocalFailureCounter(max_entries=2, clock=lambda: now[0])
    policy = DelayPolicy(
        free_failures=2, base_delay_seconds=10, max_delay_seconds=60, window_seconds=900
    )
    assert counter.reserve([("a", policy)]).failures == 1
    assert counter.reserve([("a", policy)]).failures == 2
    refused = counter.reserve([("a", policy)])
    assert refused.retry_after_seconds == 10
    now[0] += 10
    assert counter.reserve([("a", policy)]).failures == 3
    counter.succeeded("a")
    assert counter.reserve([("a", policy)]).failures == 1
    counter.released(["a"])  # an attempt without a verdict is taken back
    assert counter.reserve([("a", policy)]).failures == 1
    counter.reserve([("b", policy)])
    counter.reserve([("c", policy)])  # bounded: the least recently used key is forgotten
    assert counter.reserve([("a", policy)]).failures == 1
