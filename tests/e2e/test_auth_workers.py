"""auth in several worker processes (cake_common.workers): the gateway spreads requests over
every worker, their metrics add up on one endpoint, a worker that dies is replaced, and
SIGTERM drains every worker's in-flight calls before the unit exits.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from cake.auth.v1 import auth_pb2, auth_pb2_grpc
from cake_devtools.stack import Stack
from cake_devtools.stack.process import group_members, process_name
from cake_devtools.stack.services import grpc_serving
from cake_devtools.stack.settings import load_settings
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e

PASSWORD = "workers-pass-1"


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def _registration() -> auth_pb2.RegisterRequest:
    username = _unique("wrk")
    return auth_pb2.RegisterRequest(
        fullname="Worker Tester",
        email=f"{username}@example.com",
        username=username,
        phone="+849" + str(uuid.uuid4().int)[:9],
        password=PASSWORD,
        birthday="1990-05-06",
    )


def _endpoint_requests(admin_port: int) -> dict[str, int]:
    """Requests Envoy sent to each endpoint of the auth cluster (admin ``/clusters``)."""
    text = httpx.get(f"http://127.0.0.1:{admin_port}/clusters", timeout=5).text
    counts = {}
    for line in text.splitlines():
        # auth::/path/auth-0.sock::rq_total::12
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == "auth" and parts[2] == "rq_total":
            counts[parts[1]] = int(parts[3])
    return counts


def _handled(metrics_port: int, method: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "grpc_server_handled_total"
        and sample.labels.get("grpc_method") == method
        and sample.labels.get("grpc_code") == "OK"
    )


def _workers(pids: list[int]) -> list[int]:
    return [pid for pid in pids if process_name(pid) == "worker"]


def _wait(condition: Callable[[], bool], *, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_the_gateway_spreads_requests_over_every_auth_worker(full_stack: Stack) -> None:
    environment = full_stack.service_environment()["auth"]
    workers = int(environment["CAKE_AUTH_WORKERS"])
    # The test profile runs at least two workers (StackSettingsForTests), whatever the CPUs.
    assert workers >= 2, f"the test stack runs {workers} auth worker(s)"
    auth_pids = _workers(full_stack.processes()["auth"])
    assert len(set(auth_pids)) == workers, f"auth worker processes: {auth_pids}"

    admin_port = load_settings("test").envoy_admin_port
    metrics_port = int(environment["CAKE_AUTH_METRICS_PORT"])
    with httpx.Client(base_url=full_stack.gateway_url, timeout=30) as client:
        user = _registration()
        registered = client.post(
            "/auth/register",
            json={
                "fullname": user.fullname,
                "email": user.email,
                "username": user.username,
                "phone": user.phone,
                "password": PASSWORD,
                "birthday": user.birthday,
            },
        )
        assert registered.status_code == 201, registered.text
        token = registered.json()["access_token"]
        before, handled_before = (
            _endpoint_requests(admin_port),
            _handled(metrics_port, "GetProfile"),
        )
        reads = 100
        for _ in range(reads):
            profile = client.get("/auth/profile", headers={"authorization": f"Bearer {token}"})
            assert profile.status_code == 200, profile.text
        after, handled_after = _endpoint_requests(admin_port), _handled(metrics_port, "GetProfile")

    per_worker = {socket: after[socket] - before.get(socket, 0) for socket in after}
    assert len(per_worker) == workers, per_worker
    # Round robin: every worker served its share (exact halves are not promised: Envoy's
    # health checks and other tests' requests share the counters).
    assert all(count >= reads // (2 * workers) for count in per_worker.values()), per_worker
    # Each worker records its calls; the supervisor's endpoint adds them up.
    assert handled_after - handled_before == reads


@pytest.fixture
def auth_unit(full_stack: Stack) -> Iterator[dict[str, object]]:
    """A second auth unit of two workers on the test stack's database (its own ports and
    sockets), started as a real process group like the stack starts services."""
    import socket

    def free_port() -> int:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return int(probe.getsockname()[1])

    # Short: a Unix socket path must fit in 107 bytes.
    socket_dir = Path(tempfile.mkdtemp(prefix="cake-w-"))
    port = free_port()
    env = dict(os.environ)
    env.update(full_stack.service_environment()["auth"])
    env.update(
        {
            "CAKE_AUTH_GRPC_PORT": str(port),
            "CAKE_AUTH_METRICS_PORT": str(free_port()),
            "CAKE_AUTH_WORKERS": "2",
            "CAKE_AUTH_WORKER_SOCKET_DIR": str(socket_dir),
            "CAKE_AUTH_PASSWORD_HASH_WORKERS": "2",
            # Slow hashes keep registrations in flight long enough to stop mid-call.
            "CAKE_AUTH_BCRYPT_COST": "12",
            "CAKE_AUTH_SHUTDOWN_GRACE_SECONDS": "10",
            "PYTHONUNBUFFERED": "1",
        }
    )
    log_path = full_stack.run_dir / "logs" / f"auth-workers-test-{port}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cake_auth", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    sockets = [socket_dir / f"auth-{index}.sock" for index in range(2)]

    def all_serving() -> bool:
        assert process.poll() is None, f"auth unit exited; see {log_path}"
        return all(s.exists() and grpc_serving(f"unix:{s}") for s in sockets) and grpc_serving(
            f"127.0.0.1:{port}"
        )

    _wait(all_serving, what=f"both workers serving (log {log_path})")
    try:
        yield {
            "process": process,
            "sockets": sockets,
            "log": log_path,
            "all_serving": all_serving,
        }
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        shutil.rmtree(socket_dir, ignore_errors=True)


def test_a_worker_that_dies_is_replaced_and_sigterm_drains_every_worker(
    auth_unit: dict[str, object],
) -> None:
    process = auth_unit["process"]
    assert isinstance(process, subprocess.Popen)
    sockets = auth_unit["sockets"]
    assert isinstance(sockets, list)
    all_serving = auth_unit["all_serving"]
    assert callable(all_serving)

    workers = _workers(group_members(process.pid))
    assert len(workers) == 2, workers

    # A crash (SIGKILL: no clean-up) of one worker: the supervisor starts a new one.
    os.kill(workers[0], signal.SIGKILL)

    def replaced() -> bool:
        now = _workers(group_members(process.pid))
        return workers[0] not in now and len(now) == 2 and all_serving()

    _wait(replaced, what="the dead worker replaced")
    assert process.poll() is None
    workers = _workers(group_members(process.pid))

    # SIGTERM with registrations in flight on both workers: every one completes.
    async def register_then_stop() -> tuple[list[float], float]:
        channels = [grpc.aio.insecure_channel(f"unix:{s}") for s in sockets]
        try:
            stubs = [auth_pb2_grpc.AuthServiceStub(c) for c in channels]

            async def register(stub: auth_pb2_grpc.AuthServiceStub) -> float:
                await stub.Register(_registration(), timeout=30)
                return time.monotonic()

            calls = [asyncio.ensure_future(register(stub)) for stub in stubs for _ in range(3)]
            await asyncio.sleep(0.3)
            stopped_at = time.monotonic()
            process.send_signal(signal.SIGTERM)
            return list(await asyncio.gather(*calls)), stopped_at
        finally:
            for channel in channels:
                await channel.close()

    finished, stopped_at = asyncio.run(register_then_stop())
    assert len(finished) == 6
    assert any(at > stopped_at for at in finished), "no call was in flight at SIGTERM"
    assert process.wait(30) == 0
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    log_path = auth_unit["log"]
    assert isinstance(log_path, Path)
    log = log_path.read_text()
    assert log.count('"exit_code": 0, "event": "worker stopped"') == 2
