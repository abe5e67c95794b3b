"""A tiny run of ``make bench-enrollment``'s launch-day scenario (``bench/enrollment.py``)
against the test stack, so the scenario and ``bench/first_login_burst.py`` keep working.

Correctness only, no timing: every login decided, exactly ``min(N, max)`` vouchers with
participation orders 1..max (no gap, no repeat), everyone else told the campaign is full.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cake_devtools.stack import Stack

BENCH = Path(__file__).resolve().parents[2] / "bench"

pytestmark = pytest.mark.e2e


def test_launch_day_at_tiny_size_issues_exactly_max_vouchers(
    full_stack: Stack, tmp_path: Path
) -> None:
    completed = subprocess.run(
        [
            sys.executable, str(BENCH / "enrollment.py"),
            "--profile", "test",
            "--steps", "launch-day",
            "--launch-users", "60",
            "--launch-max", "20",
            "--launch-rate", "60",
            "--timeout", "60",
            "--out", str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    results = json.loads((tmp_path / "enrollment.json").read_text())
    (step,) = results["steps"]
    assert step["step"] == "launch-day"
    assert (step["vouchers"], step["expected"]) == (20, 20)
    assert (step["order_gaps"], step["order_repeats"]) == (0, 0)
    assert step["counts_correct"]
    (raw,) = results["raw"]
    assert raw["applied"] == 60
    assert raw["told_full"] == 40
    assert raw["participants"] == 20
    assert raw["voucher_ms"]["count"] == 20
    assert (tmp_path / "enrollment.md").read_text().count("| launch-day |") == 1


def test_the_burst_says_plainly_when_the_stack_is_not_there(tmp_path: Path) -> None:
    """Against a stack profile whose database nobody runs: one line, no traceback."""
    completed = subprocess.run(
        [sys.executable, str(BENCH / "first_login_burst.py"), "--users", "5", "--rate", "5"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={
            **os.environ,
            # A port nothing listens on: the dev stack as if it were down.
            "CAKE_PG_PORT": "1",
        },
    )
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert "Traceback" not in completed.stderr
    assert completed.stderr.startswith("first-login burst:")
