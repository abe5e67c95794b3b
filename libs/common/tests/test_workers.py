"""The worker supervisor (cake_common.workers) with real processes: a supervisor process runs
spawned workers; SIGTERM stops them all, a worker that fails to start or keeps dying fails
the unit loudly, one that dies once is replaced, and their counters add up on one endpoint.

The tests that start a supervisor are ``slow`` (three to five fresh interpreters each, 3 to 7 s
apiece): ``make test`` runs them, ``make test-unit`` leaves them out.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from cake_common.workers import WorkerPoolError, refuse_sockets_in_use

# The workers' body: spawned processes import it by name, so it is a module on disk (the
# tests' own modules are imported by path, which a spawned child cannot repeat).
PROBE = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from pathlib import Path

    from prometheus_client import Counter

    def body(behaviour, log, index, ready):
        with open(log, "a") as out:
            out.write(f"started {index} {os.getpid()}\\n")
        if behaviour == "fail_at_start":
            raise SystemExit(3)
        stopped = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stopped.set())
        Counter("probe_started", "worker starts").inc()
        ready()
        if behaviour == "crash_loop" or (
            behaviour == "crash_once" and index == 1 and not Path(log + ".crashed").exists()
        ):
            Path(log + ".crashed").touch()
            time.sleep(0.2)
            os._exit(1)
        stopped.wait()
        time.sleep(0.3)  # draining
        with open(log, "a") as out:
            out.write(f"stopped {index} {os.getpid()}\\n")
    """
)

SUPERVISOR = textwrap.dedent(
    """
    import asyncio, functools, sys
    import probe
    from cake_common.logging import configure_logging
    from cake_common.workers import WorkerPool, supervise

    configure_logging("INFO", True, service_name="probe")
    behaviour, log, metrics_port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    asyncio.run(
        supervise(
            WorkerPool(
                name="probe",
                count=2,
                target=functools.partial(probe.body, behaviour, log),
                metrics_port=metrics_port,
                grace_seconds=2,
                max_restarts=2,
                restart_window_seconds=30,
            )
        )
    )
    """
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Unit:
    def __init__(self, tmp_path: Path, behaviour: str) -> None:
        (tmp_path / "probe.py").write_text(PROBE)
        self.log = tmp_path / "workers.log"
        self.log.touch()
        self.metrics_port = _free_port()
        env = {
            **os.environ,
            "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-c", SUPERVISOR, behaviour, str(self.log), str(self.metrics_port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def lines(self, word: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if line.startswith(word)]

    def wait_for(self, word: str, count: int, timeout: float = 60) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(found := self.lines(word)) < count:
            assert self.process.poll() is None, self.output()
            assert time.monotonic() < deadline, f"{count} of {word!r}: {self.log.read_text()}"
            time.sleep(0.1)
        return found

    def output(self) -> str:
        if self.process.poll() is None:
            self.process.kill()
        return self.process.communicate(timeout=10)[0]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


StartUnit = Callable[[str], Unit]


@pytest.fixture
def unit(tmp_path: Path) -> Iterator[StartUnit]:
    units: list[Unit] = []

    def start(behaviour: str) -> Unit:
        started = Unit(tmp_path, behaviour)
        units.append(started)
        return started

    yield start
    for started in units:
        started.stop()


def _samples(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name} "))


@pytest.mark.slow  # a supervisor and its spawned workers: fresh interpreters
def test_sigterm_drains_every_worker_and_their_counters_add_up(unit: StartUnit) -> None:
    running = unit("serve")
    running.wait_for("started", 2)
    deadline = time.monotonic() + 30
    while _samples(running.metrics_port, "probe_started_total") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert _samples(running.metrics_port, "probe_started_total") == 2

    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(20) == 0, running.output()
    # Each worker finished its draining before the supervisor returned.
    assert sorted(line.split()[1] for line in running.lines("stopped")) == ["0", "1"]


@pytest.mark.slow  # a supervisor and its spawned workers: fresh interpreters
def test_a_worker_that_fails_to_start_fails_the_unit(unit: StartUnit) -> None:
    failing = unit("fail_at_start")
    assert failing.process.wait(60) != 0
    assert "exited (code 3) before it served" in failing.output()


@pytest.mark.slow  # a supervisor and its spawned workers: fresh interpreters
def test_a_worker_that_dies_is_replaced(unit: StartUnit) -> None:
    crashing = unit("crash_once")
    started = crashing.wait_for("started", 3)
    assert [line.split()[1] for line in started].count("1") == 2, started
    time.sleep(0.5)
    assert crashing.process.poll() is None
    crashing.process.send_signal(signal.SIGTERM)
    assert crashing.process.wait(20) == 0, crashing.output()
    assert sorted(line.split()[1] for line in crashing.lines("stopped")) == ["0", "1"]


@pytest.mark.slow  # a supervisor and its spawned workers: fresh interpreters
def test_workers_that_keep_dying_fail_the_unit(unit: StartUnit) -> None:
    looping = unit("crash_loop")
    assert looping.process.wait(60) != 0
    assert "workers died within 30s; giving up" in looping.output()


def test_a_socket_another_live_server_accepts_on_is_refused(tmp_path: Path) -> None:
    live, stale, absent = tmp_path / "a-0.sock", tmp_path / "a-1.sock", tmp_path / "a-2.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
        gone.bind(str(stale))  # a dead server's leftover file: nobody accepts on it
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(live))
        server.listen()

        refuse_sockets_in_use([stale, absent])  # leftovers and free paths are fine
        with pytest.raises(WorkerPoolError, match=r"a-0\.sock is served by another running"):
            refuse_sockets_in_use([stale, live, absent])
