"""Tiny runs of the benchmark scenarios and one fault drill, so they keep working.

They assert correctness only (no timing): the load scenarios (vegeta) run without errors, the
first-login burst issues exactly min(N, maxParticipants) vouchers with none doubled, no
voucher is spent twice under racing top-ups, a relay killed mid-burst loses and doubles
nothing, and the relay benchmark relays every row it times. Each runs the real entry point
(``bench/run.py``, ``bench/chaos.py``, ``bench/relay_throughput.py``) against the test
stack, as ``make bench``/``make chaos`` would against the dev stack.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cake_devtools.stack import Stack

BENCH = Path(__file__).resolve().parents[2] / "bench"

pytestmark = pytest.mark.e2e


def _run(script: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH / script), "--profile", "test", *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_load_scenarios_at_tiny_size_are_correct(full_stack: Stack, tmp_path: Path) -> None:
    completed = _run(
        "run.py",
        "--out", str(tmp_path),
        "--skip", "ceilings,login",
        "--duration", "2",
        "--users", "5",
        "--mix-rate", "4",
        "--profile-vus", "2",
        "--burst-users", "6",
        "--burst-max", "4",
        "--poll-timeout", "3",
        "--racers", "3",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    scenarios = results["scenarios"]

    assert scenarios["profile_gateway"]["error_rate"] == 0
    assert scenarios["profile_grpc_raw"]["error_rate"] == 0
    for op in ("login", "register", "profile", "refresh"):
        assert scenarios["mixed_auth"][op]["error_rate"] == 0, op
    burst = scenarios["first_login_burst"]
    assert burst["login_failed_rate"] == 0
    assert burst["vouchers_in_database"] == 4
    assert burst["users_with_voucher"] == 4
    topup = burst["topup"]
    assert topup["vouchers"] == 4
    assert topup["max_topups_per_voucher_db"] == 1
    assert topup["succeeded"] == 4
    assert topup["errors"] == 0
    assert (tmp_path / "report.md").exists()

    # CPU per request of every server process, next to each scenario's figures.
    auth_processes = len(full_stack.processes()["auth"])
    cpu = results["server_cpu"]
    assert set(cpu) == {
        "profile_grpc_raw",
        "profile_gateway",
        "mixed_auth",
        "first_login_burst (+ top-ups)",
    }
    for scenario, entry in cpu.items():
        assert entry["requests"] > 0, scenario
        assert set(entry["load_average"]) == {"start", "end"}, scenario
        components = entry["components"]
        assert {"auth", "envoy", "postgres", "redis", "promotions", "events"} <= set(components)
        # The supervisor, its workers (and uv's wrapper): every process is counted.
        assert components["auth"]["processes"] == auth_processes, scenario
        assert components["auth"]["cpu_seconds"] > 0, scenario
        assert entry["per_request_ms"] >= components["auth"]["per_request_ms"] > 0, scenario
    assert cpu["profile_gateway"]["components"]["envoy"]["cpu_seconds"] > 0
    assert "CPU ms per request of servers" in completed.stdout
    assert "## Server CPU per request" in (tmp_path / "report.md").read_text()


def test_relay_killed_mid_burst_loses_and_doubles_nothing(
    full_stack: Stack, tmp_path: Path
) -> None:
    completed = _run(
        "chaos.py",
        "--out", str(tmp_path),
        "--drills", "events",
        "--users", "10",
        "--outage", "1",
        "--settle", "1",
        "--timeout", "90",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    (drill,) = json.loads((tmp_path / "chaos.json").read_text())
    assert drill["events_written"] == 10
    assert drill["events_consumed"] == 10
    assert drill["events_lost"] == 0
    assert drill["vouchers_issued"] == 10
    assert drill["vouchers_doubled"] == 0
    assert drill["vouchers_lost"] == 0
    assert full_stack.status()["events"].healthy


def test_relay_benchmark_at_tiny_size_relays_every_row(stack: Stack) -> None:
    """The script exits non-zero if the relay counted a row it did not mark published."""
    completed = _run(
        "relay_throughput.py",
        "--rows", "3000",
        "--rounds", "2",
        "--rate", "50",
        "--lag-seconds", "1",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    rounds = [line for line in lines if line.startswith("round ")]
    assert len(rounds) == 2, completed.stdout
    (ratio,) = [line for line in lines if line.startswith("relay / raw")]
    assert float(ratio.split(":")[1].split()[0]) > 0
    (lag,) = [line for line in lines if line.startswith("commit-to-Kafka lag")]
    assert "over 50 events" in lag


def test_side_by_side_refuses_a_peer_that_does_not_answer(tmp_path: Path) -> None:
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    completed = _run("run.py", "--out", str(tmp_path), "--peer-url", f"http://127.0.0.1:{port}")
    assert completed.returncode == 1
    assert f"the peer at http://127.0.0.1:{port} does not answer" in completed.stderr
    assert not (tmp_path / "side-by-side.json").exists()


def test_side_by_side_at_tiny_size_runs_the_scenarios_on_both(
    full_stack: Stack, tmp_path: Path
) -> None:
    # The test stack's own gateway stands in for the peer: it speaks the same REST API.
    completed = _run(
        "run.py",
        "--out", str(tmp_path),
        "--peer-url", full_stack.gateway_url,
        "--duration", "2",
        "--users", "4",
        "--peer-profile-rate", "20",
        "--peer-login-rate", "3",
        "--peer-mix-rate", "4",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    compared = json.loads((tmp_path / "side-by-side.json").read_text())
    assert compared["peer_url"] == full_stack.gateway_url
    for side in ("cake", "peer"):
        figures = compared[side]
        assert figures["profile reads"]["count"] > 0, side
        assert figures["logins alone"]["count"] > 0, side
        for scenario in ("profile reads", "logins alone", "mix: login"):
            assert figures[scenario]["error_rate"] == 0, (side, scenario)
    assert "=== Cake vs peer" in completed.stdout
    # Cake's processes are known: its side carries CPU per request; the peer's does not.
    cake_cpu = compared["cake"]["server_cpu"]
    assert set(cake_cpu) == {"profile reads", "logins alone", "mix"}
    for scenario, entry in cake_cpu.items():
        assert entry["components"]["auth"]["per_request_ms"] > 0, scenario
    assert "server_cpu" not in compared["peer"]
    assert "CPU ms per request of Cake's servers" in completed.stdout
