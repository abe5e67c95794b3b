"""Session fixtures shared by every test package: real servers, started once per test run.

The test session owns a stack of real components under the ``test`` profile (its own ports
and run directory, see ``cake_devtools.stack``), so ``make test`` works whether or not a
``make up`` stack is running. Infrastructure (PostgreSQL, Redis, Kafka) starts on first use;
the three services and Envoy start only when an end-to-end test asks for ``full_stack``.

Set ``CAKE_TEST_KEEP_STACK=1`` to leave the test stack running after the session (faster
re-runs while developing); a stack that was already running is reused and left running.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from cake_devtools.stack import Stack

INFRA = ("postgres", "redis", "kafka")


def pytest_configure(config: pytest.Config) -> None:
    """Read the checkout's optional ``.ports.env`` (the Makefile includes it too).

    One ``export CAKE_TEST_...=port`` per line lets a second checkout run its test stack beside
    this one; variables already set win. Only the test profile's ``CAKE_TEST_*`` are taken: the
    dev ports (``CAKE_<SVC>_METRICS_PORT``...) are also the services' own settings, and test
    servers must not inherit them.
    """
    from dotenv import dotenv_values

    for name, value in dotenv_values(Path(__file__).parent / ".ports.env").items():
        if name.startswith("CAKE_TEST_") and value is not None:
            os.environ.setdefault(name, value)


SERVICES = ("smtp-sink", "auth", "payments", "promotions", "notifications", "events", "envoy")


@pytest.fixture(autouse=True)
def _plain_tracebacks_in_logs() -> None:
    """Logs of code under test render tracebacks as plain text, not with ``rich``.

    Unconfigured structlog (no service entry point ran ``configure_logging``) prints with
    its console renderer, which draws an exception as a rich panel with the source of every
    frame: 0.3 to 0.5 s per logged exception, most of the time of the tests that exercise
    failure paths (measured with cProfile on ``test_consumer.py``). The log lines keep their
    content; only the traceback's drawing changes. Set again before each test because a
    logging test may have reset structlog.
    """
    import structlog

    if structlog.is_configured():
        return
    processors = list(structlog.get_config()["processors"])
    structlog.configure(
        processors=[
            *processors[:-1],
            structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback),
        ]
    )


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """The ``test`` profile stack with PostgreSQL, Redis and Kafka running."""
    from cake_devtools.stack import Stack

    test_stack = Stack(profile="test")
    already_running = {name for name, status in test_stack.status().items() if status.running}
    test_stack.up(INFRA)
    yield test_stack
    if os.environ.get("CAKE_TEST_KEEP_STACK") == "1":
        return
    started_here = [c for c in (*INFRA, *SERVICES) if c not in already_running]
    test_stack.down(started_here)


@pytest.fixture(scope="session")
def full_stack(stack: Stack) -> Stack:
    """Everything, services and Envoy included, healthy: for end-to-end tests."""
    stack.up()
    return stack


@pytest.fixture(scope="session")
def kafka_bootstrap(stack: Stack) -> str:
    return stack.kafka_bootstrap


@pytest.fixture(scope="session")
def redis_url(stack: Stack) -> str:
    return stack.redis_url


def _scratch_database(stack: Stack, label: str) -> Iterator[str]:
    """Create an empty database owned by the superuser; yield its async SQLAlchemy URL."""
    import psycopg
    from psycopg import sql

    name = "t_" + re.sub(r"[^a-z0-9]+", "_", label.lower())[-40:] + "_" + secrets.token_hex(3)
    admin_url = stack.postgres_admin_url
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = admin_url.rsplit("/", 1)[0]
    yield base.replace("postgresql://", "postgresql+psycopg://", 1) + "/" + name
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="module")
def postgres_url(stack: Stack, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty database for one test module (async SQLAlchemy URL, psycopg 3)."""
    yield from _scratch_database(stack, request.module.__name__)


@pytest.fixture
def new_database(stack: Stack) -> Iterator[Callable[[str], str]]:
    """Makes fresh, empty databases on demand (``new_database(label)`` → async SQLAlchemy
    URL); all are dropped after the test."""
    from contextlib import ExitStack, contextmanager

    with ExitStack() as made:

        def new(label: str) -> str:
            return made.enter_context(contextmanager(_scratch_database)(stack, label))

        yield new


class BankSimulator:
    """The bank simulator (``cake-payments serve``) as a real child process on its own
    scratch database; tests kill, restart and reconfigure it like an outage would."""

    def __init__(self, database_url: str, log_path: Path) -> None:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._database_url = database_url
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def environment(self, **settings: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "CAKE_PAYMENTS_DATABASE_URL": self._database_url,
                "CAKE_PAYMENTS_GRPC_PORT": str(self.port),
                "CAKE_PAYMENTS_LOG_JSON": "true",
                "CAKE_PAYMENTS_SHUTDOWN_GRACE_SECONDS": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update({f"CAKE_PAYMENTS_{name.upper()}": value for name, value in settings.items()})
        return env

    def start(self, **settings: str) -> None:
        """Start it (``settings``: extra ``CAKE_PAYMENTS_*`` values) and wait until it serves."""
        import sys

        if self.running:
            return
        log = self._log_path.open("ab")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "cake_payments", "serve"],
            env=self.environment(**settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 60
        while not _grpc_serving(self.address):
            if self._process.poll() is not None:
                raise RuntimeError(f"bank simulator exited; see {self._log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"bank simulator did not start; see {self._log_path}")
            time.sleep(0.1)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def wait_exit(self, timeout: float = 10) -> int:
        assert self._process is not None
        return self._process.wait(timeout)

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self, **settings: str) -> None:
        self.stop()
        self.start(**settings)

    async def set_faults(self, *rules: Any) -> None:
        """Replace its run-wide fault rules (``cake.payments.v1.FaultRule``; none: behave)."""
        from cake.payments.v1 import payments_pb2

        await self._call("SetFaults", payments_pb2.SetFaultsRequest(rules=rules))

    async def stats(self) -> Any:
        """Ledger entries by status (``GetLedgerStatsResponse``)."""
        from cake.payments.v1 import payments_pb2

        return await self._call("GetLedgerStats", payments_pb2.GetLedgerStatsRequest())

    async def status(self, transaction_id: str) -> int:
        """The ledger's ``ChargeStatus`` of ``transaction_id`` (read only, never voids)."""
        from cake.payments.v1 import payments_pb2

        request = payments_pb2.GetChargeRequest(transaction_id=transaction_id)
        return int((await self._call("GetCharge", request)).status)

    async def _call(self, method: str, request: Any) -> Any:
        import grpc
        from cake.payments.v1 import payments_pb2_grpc

        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = payments_pb2_grpc.PaymentsServiceStub(channel)
            return await getattr(stub, method)(request, timeout=10)


def _grpc_serving(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1
            )
        except grpc.RpcError:
            return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture(scope="session")
def bank_simulator(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BankSimulator]:
    """The bank simulator, a real ``cake-payments serve`` process on a scratch database,
    started once per session (tests that break it start it again)."""
    databases = _scratch_database(stack, "bank")
    database_url = next(databases)
    simulator = BankSimulator(database_url, tmp_path_factory.mktemp("bank") / "payments.log")
    simulator.start()
    yield simulator
    simulator.stop()
    next(databases, None)
