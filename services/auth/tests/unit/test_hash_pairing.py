"""PairingPolicy: a hash joins an engine running exactly one, else the least loaded; a hash
that would run alone on an idle engine is held only while arrivals say a partner is due
within the wait (never at a trickle, never with the wait off or single-lane engines)."""

from __future__ import annotations

import math

import pytest
from cake_auth.adapters.hash_pairing import GAP_CAP_SECONDS, PairingPolicy


def _arrivals(policy: PairingPolicy, *times: float) -> None:
    for now in times:
        policy.arrived(now)


def test_nothing_is_held_before_the_rate_is_known() -> None:
    policy = PairingPolicy(2, 4, max_wait_seconds=0.06)
    policy.arrived(0.0)
    assert math.isinf(policy.expected_gap_seconds)
    assert policy.place().engine == 0


def test_a_lone_hash_is_held_when_a_partner_is_due_within_the_wait() -> None:
    policy = PairingPolicy(2, 4, max_wait_seconds=0.06)
    _arrivals(policy, 0.0, 0.05, 0.10, 0.15)
    assert policy.expected_gap_seconds == pytest.approx(0.05)
    assert policy.place().engine is None


def test_at_a_trickle_nothing_waits() -> None:
    policy = PairingPolicy(2, 4, max_wait_seconds=0.06)
    _arrivals(policy, 0.0, 0.2, 0.4, 0.6)
    assert policy.expected_gap_seconds == pytest.approx(0.2)
    assert policy.place().engine == 0


def test_a_wait_of_zero_or_single_lane_engines_never_hold() -> None:
    for policy in (
        PairingPolicy(2, 4, max_wait_seconds=0.0),
        PairingPolicy(2, 1, max_wait_seconds=0.06),
    ):
        _arrivals(policy, 0.0, 0.01, 0.02, 0.03)
        assert policy.place().engine == 0


def test_a_hash_joins_the_engine_running_exactly_one() -> None:
    policy = PairingPolicy(2, 4, max_wait_seconds=0.06)
    _arrivals(policy, 0.0, 0.05, 0.10)
    policy.submitted(1)
    assert policy.place().engine == 1
    policy.submitted(1)
    # Both engines hold a pair or nothing: the idle one would run it alone, so it is held.
    assert policy.place().engine is None


def test_under_load_hashes_spread_to_the_least_loaded_engine() -> None:
    policy = PairingPolicy(2, 4, max_wait_seconds=0.06)
    _arrivals(policy, 0.0, 0.01, 0.02)
    for _ in range(2):
        policy.submitted(0)
    for _ in range(3):
        policy.submitted(1)
    assert policy.place().engine == 0
    policy.submitted(0)
    policy.submitted(0)
    assert policy.least_loaded() == 1
    policy.finished(1)
    policy.finished(1)
    assert policy.place().engine == 1  # it runs one: join it
    assert policy.in_flight(0) == 4


def test_a_quiet_spell_counts_as_the_cap_and_is_forgotten_after_a_few_arrivals() -> None:
    policy = PairingPolicy(1, 4, max_wait_seconds=0.06)
    _arrivals(policy, 0.0, 0.05, 0.10)
    policy.arrived(600.0)  # ten quiet minutes
    assert policy.expected_gap_seconds <= GAP_CAP_SECONDS
    assert policy.place().engine == 0
    _arrivals(policy, *(600.0 + 0.05 * step for step in range(1, 12)))
    assert policy.place().engine is None


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="engines and lanes"):
        PairingPolicy(0, 4, max_wait_seconds=0.06)
    with pytest.raises(ValueError, match="max_wait_seconds"):
        PairingPolicy(1, 4, max_wait_seconds=-1)
