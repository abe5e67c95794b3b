"""The top-up saga against real PostgreSQL and the real bank simulator process, with real
faults: the bank hanging, the bank crashing after it charged, promotions SIGKILLed between
the charge and the confirmation. After the reconciler: never a charge without a succeeded
top-up, never two charges for one top-up, never a voucher reserved past its reservation
plus one reconcile interval."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from cake.payments.v1 import payments_pb2
from cake.promotions.v1 import promotions_pb2, promotions_pb2_grpc
from cake_promotions import bootstrap
from cake_promotions.metrics import PromotionsMetrics
from cake_promotions.service.enrollment import FirstLoginEnrollment
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

PHONE = "+84901234567"
DEADLINE = 0.5
PENDING_TIMEOUT = 2.0
INTERVAL = 0.5
PENDING = "Payment is still being processed; retry with the same Idempotency-Key for the result"
IN_PROGRESS = "A top-up with this Idempotency-Key is still being processed; retry later"
CHARGED = payments_pb2.CHARGE_STATUS_CHARGED
VOIDED = payments_pb2.CHARGE_STATUS_VOIDED


def ts(instant: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(instant)
    return stamp


def fault(kind: int) -> payments_pb2.FaultRule:
    return payments_pb2.FaultRule(fault=kind)


@pytest.fixture(scope="module")
async def server(start_server: Any) -> Any:
    """Short timings, so a drill fits in a test: deadline 0.5 s, reservation 2 s,
    reconciler every 0.5 s."""
    return await start_server(
        payments_deadline_seconds=DEADLINE,
        topup_pending_timeout_seconds=PENDING_TIMEOUT,
        reconcile_interval_seconds=INTERVAL,
    )


@pytest.fixture
async def bank(bank_simulator: Any) -> AsyncIterator[Any]:
    bank_simulator.start()
    await bank_simulator.set_faults()
    yield bank_simulator
    bank_simulator.start()
    await bank_simulator.set_faults()


@pytest.fixture(scope="module")
async def campaign(server: Any, signer: Any) -> Any:
    now = datetime.now(UTC)
    response = await server.stub.CreateCampaign(
        promotions_pb2.CreateCampaignRequest(
            name="Saga 30%",
            start_date=ts(now - timedelta(hours=1)),
            end_date=ts(now + timedelta(days=30)),
            max_participants=10000,
            discount_percentage=30,
        ),
        metadata=signer.metadata(1, "admin"),
    )
    return response.campaign


@pytest.fixture
def voucher_for(engine: AsyncEngine, campaign: Any) -> Callable[[int], Any]:
    """The voucher a user's first login (auth's event) earns in the campaign."""
    enrollment = FirstLoginEnrollment(
        bootstrap.unit_of_work_factory(engine), PromotionsMetrics(CollectorRegistry())
    )

    async def issue(user_id: int) -> str:
        outcome = await enrollment.enroll_first_login(
            user_id, datetime.now(UTC), event_id=uuid.uuid4()
        )
        assert outcome is not None and outcome.voucher is not None, outcome
        return outcome.voucher.code

    return issue


def topup(amount: float, code: str | None) -> promotions_pb2.TopupRequest:
    request = promotions_pb2.TopupRequest(phone_number=PHONE, amount=amount)
    if code is not None:
        request.voucher_code = code
    return request


async def ledger_of(engine: AsyncEngine, user: int) -> list[tuple[str, str, str | None]]:
    """(transaction id, top-up status, voucher status) of the user's top-ups."""
    async with engine.connect() as connection:
        rows = await connection.execute(
            sa.text(
                "SELECT t.transaction_id, t.status, v.status FROM topups t"
                " LEFT JOIN vouchers v ON v.id = t.voucher_id WHERE t.user_id = :u ORDER BY t.id"
            ),
            {"u": user},
        )
        return [(row[0], row[1], row[2]) for row in rows]


async def wait_settled(engine: AsyncEngine, users: list[int], within: float = 20) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        async with engine.connect() as connection:
            pending = await connection.scalar(
                sa.text(
                    "SELECT count(*) FROM topups WHERE status = 'pending' AND user_id = ANY(:u)"
                ),
                {"u": users},
            )
        if pending == 0:
            return
        await asyncio.sleep(0.2)
    raise AssertionError("top-ups still pending after the reconciler's rounds")


async def test_a_hanging_bank_leaves_nothing_charged_nothing_locked_nothing_stuck(
    server: Any,
    bank: Any,
    signer: Any,
    voucher_for: Any,
    unique: Callable[[], int],
    engine: AsyncEngine,
) -> None:
    await bank.set_faults(fault(payments_pb2.FAULT_HANG))
    users = [unique() for _ in range(10)]
    codes = [await voucher_for(user) for user in users]
    charged_before = (await bank.stats()).charged

    began = time.monotonic()
    calls = asyncio.gather(
        *(
            server.stub.Topup(
                topup(50000, code),
                metadata=(*signer.metadata(user), ("idempotency-key", f"hang-{user}")),
            )
            for user, code in zip(users, codes, strict=True)
        ),
        return_exceptions=True,
    )
    # While the bank hangs: no session sits in an open transaction (the charge runs outside
    # any), so no row lock or pooled connection waits on the bank.
    await asyncio.sleep(DEADLINE * 0.8)
    async with engine.connect() as connection:
        held_open = await connection.scalar(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND state LIKE 'idle in transaction%'"
                " AND clock_timestamp() - state_change > interval '200 milliseconds'"
            )
        )
    assert held_open == 0
    results = await calls
    answered_in = time.monotonic() - began
    assert answered_in < DEADLINE + 3  # the deadline, not the hang, decides
    for result in results:
        assert isinstance(result, grpc.aio.AioRpcError)
        assert (result.code(), result.details()) == (grpc.StatusCode.UNAVAILABLE, PENDING)
        assert any(key == "retry-after" for key, _ in result.trailing_metadata() or ())

    # Recorded pending, vouchers reserved until the reconciler settles them.
    async with engine.connect() as connection:
        reserved = await connection.scalar(
            sa.text("SELECT count(*) FROM vouchers WHERE status = 'reserved' AND code = ANY(:c)"),
            {"c": codes},
        )
    assert reserved == 10

    # A retry with the same key while pending: 409 with Retry-After.
    with pytest.raises(grpc.aio.AioRpcError) as busy:
        await server.stub.Topup(
            topup(50000, codes[0]),
            metadata=(*signer.metadata(users[0]), ("idempotency-key", f"hang-{users[0]}")),
        )
    assert (busy.value.code(), busy.value.details()) == (grpc.StatusCode.ABORTED, IN_PROGRESS)
    retry_after = dict(busy.value.trailing_metadata() or ())["retry-after"]
    assert 1 <= int(retry_after) <= PENDING_TIMEOUT + INTERVAL + 1

    await wait_settled(engine, users, within=PENDING_TIMEOUT + 10 * INTERVAL + 10)
    settled_at = datetime.now(UTC)
    for user in users:
        ((txn, status, voucher),) = await ledger_of(engine, user)
        assert (status, voucher) == ("failed", "active")
        assert await bank.status(txn) == VOIDED
    assert (await bank.stats()).charged == charged_before
    async with engine.connect() as connection:
        overdue = await connection.scalar(
            sa.text(
                "SELECT count(*) FROM vouchers WHERE status = 'reserved' AND reserved_until < :t"
            ),
            {"t": settled_at - timedelta(seconds=INTERVAL + 1)},
        )
    assert overdue == 0

    # The bank is back: the same key tries again (a failed top-up is not replayed).
    await bank.set_faults()
    retried = await server.stub.Topup(
        topup(50000, codes[0]),
        metadata=(*signer.metadata(users[0]), ("idempotency-key", f"hang-{users[0]}")),
    )
    assert retried.message == "Top-up successful! You saved 15000 with your voucher."


async def test_bank_crash_after_charging_is_confirmed_by_the_reconciler(
    server: Any,
    bank: Any,
    signer: Any,
    voucher_for: Any,
    unique: Callable[[], int],
    engine: AsyncEngine,
) -> None:
    user = unique()
    code = await voucher_for(user)
    key = (("idempotency-key", f"crash-{user}"),)
    await bank.set_faults(fault(payments_pb2.FAULT_CRASH_AFTER_CHARGE))
    with pytest.raises(grpc.aio.AioRpcError) as crashed:
        await server.stub.Topup(topup(100, code), metadata=signer.metadata(user) + key)
    assert crashed.value.code() is grpc.StatusCode.UNAVAILABLE
    bank.wait_exit()
    ((txn, status, voucher),) = await ledger_of(engine, user)
    assert (status, voucher) == ("pending", "reserved")

    bank.start()  # its run-wide faults came from the admin call: gone with the process
    await wait_settled(engine, [user], within=PENDING_TIMEOUT + 10 * INTERVAL + 10)
    assert await ledger_of(engine, user) == [(txn, "succeeded", "used")]
    assert await bank.status(txn) == CHARGED

    replayed = await server.stub.Topup(topup(100, code), metadata=signer.metadata(user) + key)
    assert (replayed.transaction_id, replayed.final_amount) == (txn, 70)
    assert replayed.message == "Top-up successful! You saved 30 with your voucher."


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_promotions_process(
    database_url: str, jwks_file: Path, bank_address: str, log: Path, **settings: str
) -> tuple[subprocess.Popen[bytes], str]:
    """``cake-promotions serve`` as a real process (what the stack runs)."""
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "CAKE_PROMOTIONS_DATABASE_URL": database_url,
            "CAKE_PROMOTIONS_GRPC_PORT": str(port),
            "CAKE_PROMOTIONS_JWKS_FILE": str(jwks_file),
            "CAKE_PROMOTIONS_CONSUMER_ENABLED": "false",
            "CAKE_PROMOTIONS_PAYMENTS_TARGET": bank_address,
            "CAKE_PROMOTIONS_PAYMENTS_DEADLINE_SECONDS": str(DEADLINE),
            "CAKE_PROMOTIONS_TOPUP_PENDING_TIMEOUT_SECONDS": str(PENDING_TIMEOUT),
            "CAKE_PROMOTIONS_RECONCILE_INTERVAL_SECONDS": str(INTERVAL),
            "CAKE_PROMOTIONS_SHUTDOWN_GRACE_SECONDS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update({f"CAKE_PROMOTIONS_{name.upper()}": value for name, value in settings.items()})
    with log.open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "cake_promotions", "serve"],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    return process, f"127.0.0.1:{port}"


async def wait_serving(address: str, process: subprocess.Popen[bytes]) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 60
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, "promotions exited while starting"
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError("promotions did not start")


async def test_promotions_sigkilled_between_charge_and_confirm_loses_nothing(
    database_url: str,
    server: Any,
    bank: Any,
    signer: Any,
    voucher_for: Any,
    unique: Callable[[], int],
    engine: AsyncEngine,
    tmp_path: Path,
) -> None:
    user = unique()
    code = await voucher_for(user)
    key = (("idempotency-key", f"sigkill-{user}"),)
    charged_before = (await bank.stats()).charged
    log = tmp_path / "promotions.log"

    # The fault hook kills promotions right after the bank answered "charged".
    doomed, address = start_promotions_process(
        database_url, signer.jwks_file, bank.address, log, fault_kill_after_charge="true"
    )
    try:
        await wait_serving(address, doomed)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = promotions_pb2_grpc.PromotionsServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as killed:
                await stub.Topup(topup(1000, code), metadata=signer.metadata(user) + key)
        assert killed.value.code() is grpc.StatusCode.UNAVAILABLE
        assert doomed.wait(10) == -9
    finally:
        if doomed.poll() is None:
            doomed.kill()
    ((txn, status, voucher),) = await ledger_of(engine, user)
    assert (status, voucher) == ("pending", "reserved")
    assert await bank.status(txn) == CHARGED  # charged, and recorded: pending

    # Restarted without the hook: its reconciler confirms the charge.
    revived, address = start_promotions_process(database_url, signer.jwks_file, bank.address, log)
    try:
        await wait_serving(address, revived)
        await wait_settled(engine, [user], within=PENDING_TIMEOUT + 10 * INTERVAL + 10)
        assert await ledger_of(engine, user) == [(txn, "succeeded", "used")]
        assert (await bank.stats()).charged == charged_before + 1
        async with grpc.aio.insecure_channel(address) as channel:
            stub = promotions_pb2_grpc.PromotionsServiceStub(channel)
            replayed = await stub.Topup(topup(1000, code), metadata=signer.metadata(user) + key)
        assert replayed.transaction_id == txn
        assert replayed.message == "Top-up successful! You saved 300 with your voucher."
    finally:
        revived.terminate()
        revived.wait(15)


async def test_a_held_lock_and_an_exhausted_pool_answer_unavailable_quickly(
    start_server: Any,
    server: Any,
    signer: Any,
    voucher_for: Any,
    unique: Callable[[], int],
    engine: AsyncEngine,
) -> None:
    small = await start_server(
        database_pool_size=1,
        database_max_overflow=0,
        database_pool_timeout_seconds=0.5,
        database_lock_timeout_ms=1000,
    )
    user = unique()
    code = await voucher_for(user)
    async with engine.connect() as blocker:
        transaction = await blocker.begin()
        await blocker.execute(
            sa.text("SELECT 1 FROM vouchers WHERE code = :c FOR UPDATE"), {"c": code}
        )
        began = time.monotonic()
        # Waits for the voucher's lock on the only pooled connection...
        waiting = asyncio.ensure_future(
            small.stub.Topup(topup(100, code), metadata=signer.metadata(user))
        )
        await asyncio.sleep(0.2)
        # ...so anything else finds the pool empty: UNAVAILABLE after the pool timeout.
        with pytest.raises(grpc.aio.AioRpcError) as no_connection:
            await small.stub.ListCampaigns(promotions_pb2.ListCampaignsRequest())
        assert no_connection.value.code() is grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - began < 2
        with pytest.raises(grpc.aio.AioRpcError) as no_lock:
            await waiting
        assert no_lock.value.code() is grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - began < 3
        await transaction.rollback()
    assert await ledger_of(engine, user) == []
    done = await small.stub.Topup(topup(100, code), metadata=signer.metadata(user))
    assert done.discount_amount == 30
