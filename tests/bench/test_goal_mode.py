"""The goal mode's pieces (bench/side_by_side.py, loadgen.py, benchlib.py, report.py).

vegeta's answers are classified against a real vegeta run on a real local HTTP server that
refuses, refuses badly and hangs past the client's timeout; the peer's server processes are
found among real processes by their port, pid file and children; the goals are judged on
figures built by hand (pure logic)."""

from __future__ import annotations

import copy
import importlib
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).parents[2] / "bench"


@pytest.fixture(scope="module")
def bench() -> Iterator[dict[str, ModuleType]]:
    """bench/'s modules (scripts importing each other by name, as when run from bench/)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield {
            name: importlib.import_module(name)
            for name in ("benchlib", "loadgen", "report", "side_by_side")
        }
    finally:
        sys.path.remove(str(BENCH))


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/hang"):
            time.sleep(2.5)
        if self.path.startswith("/busy"):
            self.send_response(503)
            self.send_header("Retry-After", "1")
        elif self.path.startswith("/bare"):
            self.send_response(503)
        else:
            self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.slow
def test_a_real_vegeta_run_tells_refusals_bad_refusals_and_timeouts_apart(
    bench: dict[str, ModuleType], server: str, tmp_path: Path
) -> None:
    loadgen = bench["loadgen"]
    if not loadgen.VEGETA.exists():
        pytest.fail(f"{loadgen.VEGETA} missing: tools/bootstrap.sh builds it")
    target = loadgen.Target
    targets = [
        target.get("login", f"{server}/ok"),
        target.get("login", f"{server}/busy"),
        target.get("login", f"{server}/bare"),
        target.get("login", f"{server}/hang"),
    ]
    summary = loadgen.attack(
        "classes",
        targets,
        tmp_path,
        duration_s=2,
        rate=10,
        workers=10,
        timeout_s=1,
        window=(0.5, 2),
    )
    statuses = summary["statuses"]["login"]
    sent = sum(statuses.values())
    assert sent == 20
    # Sent in order, cycling: five of each.
    assert statuses == {"200": 5, "503": 10, "0": 5}
    answers = summary["metrics"]["op_login_answers"]["values"]
    assert answers == {"no_answer": 5, "timeouts": 5, "refused_without_retry_after": 5}
    assert summary["metrics"]["op_login_refused_ms"]["values"]["count"] == 10
    window = summary["metrics"]["op_login_window"]["values"]
    # The five 200s answer at once, 0.4 s apart from t = 0: those from 0.5 s to 2 s count.
    assert window["ok"] in (3, 4)
    assert window["ok_per_second"] == pytest.approx(window["ok"] / 1.5)


def test_fractional_rates_are_sent_as_whole_requests_per_period(
    bench: dict[str, ModuleType],
) -> None:
    rate = bench["loadgen"]._vegeta_rate
    assert rate(36.0) == "36/1s"
    assert rate(179.2) == "17920/100s"
    assert rate(0.5) == "50/100s"


def _vegeta_result(seq: int, code: int, at: str, latency_ms: float, **extra: Any) -> dict[str, Any]:
    return {
        "url": f"http://x/auth/login#{seq}",
        "code": code,
        "timestamp": f"2026-12-05T07:00:{at}Z",
        "latency": int(latency_ms * 1e6),
        "error": "",
        "headers": {},
        **extra,
    }


def test_the_window_counts_successes_completed_inside_it(bench: dict[str, ModuleType]) -> None:
    loadgen = bench["loadgen"]
    targets = [loadgen.Target.json("login", "http://x/auth/login", {})] * 4
    results = [
        _vegeta_result(0, 200, "00.000", 100),  # done at 0.1 s: before the window
        _vegeta_result(1, 200, "01.000", 500),  # done at 1.5 s: inside
        _vegeta_result(2, 200, "02.000", 2500),  # done at 4.5 s: after it
        _vegeta_result(3, 503, "02.500", 5, headers={"Retry-After": ["1"]}),
    ]
    summary = loadgen.summarise(results, targets, window=(1, 3))
    window = summary["metrics"]["op_login_window"]["values"]
    assert window == {"from_s": 1, "to_s": 3, "ok": 1.0, "ok_per_second": 0.5}
    answers = summary["metrics"]["op_login_answers"]["values"]
    assert answers["refused_without_retry_after"] == 0


def test_the_window_latency_is_of_the_requests_sent_inside_it(
    bench: dict[str, ModuleType],
) -> None:
    loadgen = bench["loadgen"]
    targets = [loadgen.Target.json("login", "http://x/auth/login", {})] * 4
    results = [
        _vegeta_result(0, 200, "00.000", 900),  # sent before the window (the warm-up)
        _vegeta_result(1, 200, "01.000", 10),  # sent inside it
        _vegeta_result(2, 503, "02.000", 2500, headers={"Retry-After": ["1"]}),  # inside
        _vegeta_result(3, 200, "03.500", 30),  # sent after it
    ]
    summary = loadgen.summarise(results, targets, window=(1, 3))
    steady = summary["metrics"]["op_login_window_ms"]["values"]
    assert (steady["count"], steady["min"], steady["max"]) == (2.0, 10.0, 2500.0)
    assert summary["metrics"]["op_login_ms"]["values"]["count"] == 4.0


def test_the_profile_p99_goal_is_the_steady_parts(bench: dict[str, ModuleType]) -> None:
    """The p99 of the requests sent after the warm-up decides; the whole run's is shown."""
    result = _met_everywhere()
    result["cake"]["profile reads at 1.5 x the peer's"].update(p99=80.0, steady_p99=30.0)
    goals = {goal["goal"]: goal for goal in bench["side_by_side"].goals(result)}
    (row,) = [goal for name, goal in goals.items() if "profile reads p99 at" in name]
    assert row["verdict"] == "PASS"
    assert row["cake"] == 30.0
    assert "with the warm-up: 80.0 ms" in row["note"]


def _listener_script(port_file: Path, pid_file: Path) -> str:
    return textwrap.dedent(
        f"""
        import os, socket, subprocess, sys, time
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pid_file)!r}, "w").write(str(child.pid) + "\\n")
        while time.process_time() < 0.3:
            pass  # some CPU to be counted
        open({str(port_file)!r}, "w").write(str(listener.getsockname()[1]))
        time.sleep(60)
        """
    )


def test_a_peers_processes_are_found_by_port_and_pid_file_with_children(
    bench: dict[str, ModuleType], tmp_path: Path
) -> None:
    benchlib = bench["benchlib"]
    port_file, pid_file = tmp_path / "port", tmp_path / "child.pid"
    server = subprocess.Popen([sys.executable, "-c", _listener_script(port_file, pid_file)])
    try:
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        port = int(port_file.read_text())
        child = int(pid_file.read_text())
        before = benchlib.CpuSample(0.0, {})

        by_port = benchlib.find_server_processes([port])
        assert list(by_port.roots.values()) == [(server.pid,)]
        (members,) = by_port.members().values()
        assert members == sorted([server.pid, child])

        # The child's pid file names a descendant of a root: counted once, with its root.
        both = benchlib.find_server_processes([port], [pid_file])
        assert list(both.roots.values()) == [(server.pid,)]
        alone = benchlib.find_server_processes([], [pid_file])
        assert list(alone.roots.values()) == [(child,)]

        sample = by_port.sample()
        (ticks,) = sample.ticks.values()
        assert set(ticks) == {server.pid, child}
        assert benchlib.server_cpu(before, sample, 1)["cpu_seconds"] >= 0.29

        # By the peer script's layout: the URL's port.
        peer = benchlib.find_peer_processes(f"http://127.0.0.1:{port}", None)
        assert peer.roots == by_port.roots
    finally:
        server.kill()
        server.wait()
        if pid_file.exists():
            subprocess.run(["kill", pid_file.read_text().strip()], check=False)


def test_nothing_listening_finds_nothing(bench: dict[str, ModuleType]) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    found = bench["benchlib"].find_server_processes([port])
    assert found.roots == {}
    assert found.sample().ticks == {}


def _login(goodput: float, **figures: Any) -> dict[str, Any]:
    base = {
        "seconds": 60.0,
        "sent": 100,
        "ok": 100,
        "refused": 0,
        "refused_without_retry_after": 0,
        "timeouts": 0,
        "no_answer": 0,
        "other_errors": 0,
        "errors": 0,
        "goodput": goodput,
        "p95": 100.0,
        "p99": 150.0,
        "steady_p99": 150.0,
        "steady_count": 90,
        "window_s": [5.0, 60.0],
        "accepted_p95": 100.0,
        "refused_p95": 0.0,
        "cpu": {"components": {"x": {}}, "net_of_idle_per_served_ms": 55.0, "per_served_ms": 57.0},
    }
    return {**base, **figures}


def _met_everywhere() -> dict[str, Any]:
    mix_ops = {op: _login(0, p95=50.0) for op in ("login", "register", "profile")}
    cake = {
        "hash_check": {"cpu_ms": 52.0, "hasher": "libxcrypt"},
        "logins at the CPU rate": _login(20),
        "login saturation": _login(40),
        "overload": _login(39, refused=50, errors=50, refused_p95=5.0, accepted_p95=900.0),
        "profile saturation": _login(2000),
        "profile reads at 1.5 x the peer's": _login(1200, p99=20.0, steady_p99=20.0),
        "mix": {"ops": mix_ops},
    }
    peer = copy.deepcopy(cake)
    peer["hash_check"] = {"cpu_ms": 54.0}
    peer["login saturation"] = _login(31)
    peer["overload"] = _login(30, timeouts=40, errors=40, no_answer=40, accepted_p95=8000.0)
    peer["profile saturation"] = _login(800)
    for figures in peer["mix"]["ops"].values():
        figures["p95"] = 60.0
    return {
        "cake": cake,
        "peer": peer,
        "settings": {
            "saturation_rate": 46,
            "cpu_login_rate": 20,
            "overload_rate": 60,
            "client_timeout_s": 10,
            "profile_connections": 64,
            "profile_rate": 1200,
            "mix_rate": 36,
        },
        "guards": {
            "relay": {"ratio": 0.55, "rows": 50000},
            "enrollment": {"p99_ms": 120.0, "goal_met": True, "vouchers": 1000},
        },
    }


def _verdicts(side_by_side: ModuleType, result: dict[str, Any]) -> dict[str, str]:
    return {goal["goal"]: goal["verdict"] for goal in side_by_side.goals(result)}


def test_goals_met_everywhere_pass(bench: dict[str, ModuleType]) -> None:
    verdicts = _verdicts(bench["side_by_side"], _met_everywhere())
    assert set(verdicts.values()) == {"PASS", "info"}
    assert len([v for v in verdicts.values() if v == "PASS"]) == 14


@pytest.mark.parametrize(
    ("change", "failing"),
    [
        (lambda r: r["cake"]["login saturation"].update(goodput=34.0), "login saturation"),
        (
            lambda r: r["cake"]["logins at the CPU rate"]["cpu"].update(
                net_of_idle_per_served_ms=55.5
            ),
            "server CPU per login",
        ),
        (lambda r: r["cake"]["overload"].update(goodput=37.9), "overload 60/s for 60s"),
        (lambda r: r["cake"]["overload"].update(accepted_p95=2000.0), "p95 of accepted"),
        (
            lambda r: r["cake"]["overload"].update(refused_without_retry_after=1),
            "refusals' p95",
        ),
        (lambda r: r["cake"]["overload"].update(refused_p95=300.0), "refusals' p95"),
        (lambda r: r["cake"]["overload"].update(other_errors=1, errors=51), "refusals' p95"),
        (lambda r: r["cake"]["overload"].update(timeouts=1), "client timeouts"),
        (lambda r: r["cake"]["profile saturation"].update(goodput=1599.0), "saturation (64"),
        (
            lambda r: r["cake"]["profile reads at 1.5 x the peer's"].update(steady_p99=50.0),
            "p99 at",
        ),
        (lambda r: r["cake"]["mix"]["ops"]["register"].update(p95=60.1), "register p95"),
        (lambda r: r["cake"]["mix"]["ops"]["login"].update(errors=1), "errors"),
        (lambda r: r["guards"]["relay"].update(ratio=0.49), "relay"),
        (lambda r: r["guards"]["enrollment"].update(goal_met=False), "first login"),
        (lambda r: r["guards"].update(relay={"error": "OSError: down"}), "relay"),
    ],
)
def test_one_goal_missed_fails_that_goal_only(
    bench: dict[str, ModuleType], change: Any, failing: str
) -> None:
    result = _met_everywhere()
    change(result)
    failed = [name for name, verdict in _verdicts(bench["side_by_side"], result).items()
              if verdict == "FAIL"]  # fmt: skip
    assert len(failed) == 1, failed
    assert failing in failed[0]


def test_the_markdown_table_has_a_row_per_goal(bench: dict[str, ModuleType]) -> None:
    result = _met_everywhere()
    result["goals"] = bench["side_by_side"].goals(result)
    result.update(
        peer_url="http://127.0.0.1:3300",
        started_at="2026-12-05T07:00:00+00:00",
        finished_at="2026-12-05T07:09:00+00:00",
        cores=2,
        load_average={"start": [0.5, 0.4, 0.3], "end": [1.9, 1.0, 0.6]},
        peer_processes={"node": [1], "postgres": [2], "redis-server": [3]},
    )
    lines = bench["report"].goal_table_lines(result)
    rows = [line for line in lines if line.startswith("| ") and "---" not in line]
    assert len(rows) == len(result["goals"]) + 1  # the header
    assert "load average (1, 5, 15 min) 0.50 / 0.40 / 0.30 at the start" in lines[0]
    assert rows[1].startswith("| login saturation") and rows[1].endswith("| PASS |")
    assert "node, postgres, redis-server" in lines[-1]


def test_a_phase_waits_until_the_other_side_has_settled_too(
    bench: dict[str, ModuleType], tmp_path: Path
) -> None:
    """The sides share the cores: Cake's phase must not start while the peer still works off
    the previous load (a peer without admission control keeps hashing the logins its clients
    gave up on). Here the "peer" is a real process that burns a core for 2.5 s, then idles;
    the phase run on the quiet side only starts once that burning stopped."""
    benchlib, side_by_side = bench["benchlib"], bench["side_by_side"]
    from cake_devtools.stack.process import cpu_ticks

    burner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nend = time.monotonic() + 2.5\nwhile time.monotonic() < end: pass\n"
            "time.sleep(60)",
        ]
    )
    idler = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    def sample_of(pid: int) -> Any:
        return lambda: benchlib.CpuSample(0.0, {"server": {pid: cpu_ticks(pid) or 0}})

    try:
        started = time.monotonic()
        busy = side_by_side.Side("peer", "", sample_of(burner.pid), tmp_path)
        quiet = side_by_side.Side("cake", "", sample_of(idler.pid), tmp_path)
        ran_at: list[float] = []
        args = type("Args", (), {"settle_seconds": 20.0})()
        side_by_side._both(
            [quiet, busy],
            args,
            "reads",
            lambda side: ran_at.append(time.monotonic() - started),
            only=[quiet],
        )
        assert quiet.figures == {"reads": None} and "reads" not in busy.figures
        # Settling the quiet side alone would have run it at once.
        (at,) = ran_at
        assert at >= 2.0, f"the phase ran {at:.1f}s in, while the other side was busy"
    finally:
        for process in (burner, idler):
            process.kill()
            process.wait()
