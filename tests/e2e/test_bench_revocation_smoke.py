"""A tiny run of ``bench/revocation_cost.py`` so it keeps working: two auth servers from the
real composition root, one of them without the revocation check, and the proof at the end
that they differ in that check (the script exits non-zero otherwise). No timing asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cake_devtools.stack import Stack

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "revocation_cost.py"

pytestmark = pytest.mark.e2e


def test_the_revocation_cost_benchmark_compares_two_servers_that_differ_in_the_check(
    full_stack: Stack,
) -> None:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--profile", "test", "--seconds", "1", "--concurrency", "2"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    output = completed.stdout + completed.stderr[-3000:]
    assert completed.returncode == 0, output
    lines = {line.split()[0] + " " + line.split()[1]: line for line in completed.stdout.splitlines()
             if line.startswith("  with check") or line.startswith("  without check")}  # fmt: skip
    assert set(lines) == {"with check", "without check"}, output
    for line in lines.values():
        reads = int(line.rsplit("(", 1)[1].split()[0])
        assert reads > 0, line
    assert "throughput lost to the check:" in completed.stdout
    assert "the servers differ in the check" in completed.stdout
