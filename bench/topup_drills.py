"""Top-up drills of ``make chaos``: the saga against a broken bank, a killed promotions and a
stopped PostgreSQL, through the gateway with real clients.

Every drill gives N users a voucher (first logins), sets the bank's run-wide fault to a 2 s
delay (so the P99 is measured against a slow bank), and has each user top up once with an
Idempotency-Key, retrying as a careful app would (503 and 409: wait, retry with the same
key) while the drill's fault happens:

- ``bank-hang``: the bank hangs while all N top-ups arrive at once (distinct vouchers);
- ``promotions-sigkill``: promotions runs with its fault hook, which SIGKILLs it right after
  the bank answered the first charge; it is restarted without the hook;
- ``bank-down``: the bank is stopped for ``--bank-outage`` s (10) during steady top-ups;
- ``postgres-topups``: PostgreSQL is stopped for ``--outage`` s during steady top-ups.

After the clients are done and the reconciler had its rounds, the drill counts, for its
users: charges on the bank's ledger, succeeded top-ups, double charges (a user charged more
than once), charges without a succeeded top-up, vouchers still reserved. Pass = charges ==
succeeded, and 0, 0, 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc
import httpx
import sqlalchemy as sa
from benchlib import Gateway, SeededUser, percentile, say, service_database, voucher_counts
from cake.payments.v1 import payments_pb2, payments_pb2_grpc
from cake_devtools.stack import Stack
from sqlalchemy.ext.asyncio import AsyncEngine

TOPUP_DRILLS = ("bank-hang", "promotions-sigkill", "bank-down", "postgres-topups")
KILL_HOOK = "CAKE_PROMOTIONS_FAULT_KILL_AFTER_CHARGE"
BANK_DELAY_MS = 2000
AMOUNT = 100000  # 30 % capped at 20000: charged 80000


@dataclass
class TopupDrillResult:
    drill: str
    users: int
    topups_done: int
    charges: int
    succeeded: int
    double_charges: int
    unrecorded_charges: int
    vouchers_reserved: int
    pending_left: int
    p99_ms: float | None
    p50_ms: float | None
    attempts: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (
            self.charges == self.succeeded
            and self.double_charges == 0
            and self.unrecorded_charges == 0
            and self.vouchers_reserved == 0
            and self.pending_left == 0
        )


class Bank:
    """The bank simulator's admin calls (its fault switch)."""

    def __init__(self, stack: Stack) -> None:
        port = stack.service_environment()["payments"]["CAKE_PAYMENTS_GRPC_PORT"]
        self.address = f"127.0.0.1:{port}"

    async def faults(self, *rules: payments_pb2.FaultRule) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = payments_pb2_grpc.PaymentsServiceStub(channel)
            await stub.SetFaults(payments_pb2.SetFaultsRequest(rules=rules), timeout=5)

    async def slow(self) -> None:
        await self.faults(
            payments_pb2.FaultRule(fault=payments_pb2.FAULT_DELAY, delay_ms=BANK_DELAY_MS)
        )


@dataclass
class Client:
    user: SeededUser
    code: str
    key: str = field(default_factory=lambda: f"drill-{uuid.uuid4().hex}")
    attempts: int = 0
    done_ms: float | None = None
    """Latency of the attempt that succeeded."""


async def top_up_until_done(gateway: Gateway, client: Client, deadline: float) -> None:
    """One top-up, retried with the same key until it succeeds (503, 409, 5xx: wait, retry)."""
    while time.monotonic() < deadline:
        client.attempts += 1
        began = time.monotonic()
        try:
            response = await gateway.call(
                "POST",
                "/promotions/topup",
                token=client.user.token,
                body={"phoneNumber": "+84901234567", "amount": AMOUNT, "voucherCode": client.code},
                headers={"idempotency-key": client.key},
            )
        except httpx.HTTPError:
            await asyncio.sleep(0.5)
            continue
        if response.status_code == 200:
            client.done_ms = (time.monotonic() - began) * 1000
            return
        if response.status_code in (409, 429) or response.status_code >= 500:
            retry_after = float(response.headers.get("retry-after", "1") or 1)
            await asyncio.sleep(min(max(retry_after, 0.5), 2.0))
            continue
        raise RuntimeError(f"top-up refused: {response.status_code} {response.text[:200]}")


async def vouchers_for(
    gateway: Gateway, promotions: AsyncEngine, admin: str, users: int, *, deadline: float
) -> list[Client]:
    campaign = await gateway.create_campaign(
        admin, users, f"top-up drill {datetime.now(UTC):%H:%M:%S}"
    )
    seeded = await gateway.register_many(users, "topup", login_once=True)
    while time.monotonic() < deadline:
        _, holders = await voucher_counts(promotions, campaign)
        if holders >= users:
            break
        await asyncio.sleep(0.3)
    async with promotions.connect() as connection:
        rows = await connection.execute(
            sa.text(
                "SELECT v.user_id, v.code FROM vouchers v JOIN user_promotions up"
                " ON up.id = v.user_promotion_id WHERE up.campaign_id = :c"
            ),
            {"c": campaign},
        )
        codes = {int(row[0]): str(row[1]) for row in rows}
    await gateway.end_campaign(admin, campaign)
    return [Client(user, codes[user.user_id]) for user in seeded if user.user_id in codes]


async def pending_of(promotions: AsyncEngine, user_ids: list[int]) -> int:
    try:
        async with promotions.connect() as connection:
            value = await connection.scalar(
                sa.text(
                    "SELECT count(*) FROM topups WHERE status = 'pending' AND user_id = ANY(:u)"
                ),
                {"u": user_ids},
            )
        return int(value or 0)
    except (OSError, sa.exc.SQLAlchemyError):
        return -1


async def count(
    promotions: AsyncEngine, bank: AsyncEngine, user_ids: list[int]
) -> tuple[int, int, int, int, int, int]:
    """(charges, succeeded, double charges, unrecorded charges, reserved vouchers, pending)."""
    async with promotions.connect() as connection:
        topups = (
            await connection.execute(
                sa.text("SELECT transaction_id, status FROM topups WHERE user_id = ANY(:u)"),
                {"u": user_ids},
            )
        ).all()
        reserved = await connection.scalar(
            sa.text(
                "SELECT count(*) FROM vouchers WHERE status = 'reserved' AND user_id = ANY(:u)"
            ),
            {"u": user_ids},
        )
    async with bank.connect() as connection:
        charged = (
            await connection.execute(
                sa.text(
                    "SELECT transaction_id, user_id FROM ledger"
                    " WHERE status = 'charged' AND user_id = ANY(:u)"
                ),
                {"u": user_ids},
            )
        ).all()
    succeeded = {txn for txn, status in topups if status == "succeeded"}
    per_user: dict[int, int] = {}
    for _, user_id in charged:
        per_user[user_id] = per_user.get(user_id, 0) + 1
    doubles = sum(n - 1 for n in per_user.values() if n > 1)
    unrecorded = sum(1 for txn, _ in charged if txn not in succeeded)
    pending = sum(1 for _, status in topups if status == "pending")
    return len(charged), len(succeeded), doubles, unrecorded, int(reserved or 0), pending


async def restart_promotions(stack: Stack, *, hook: bool) -> None:
    if hook:
        os.environ[KILL_HOOK] = "true"
    else:
        os.environ.pop(KILL_HOOK, None)
    await asyncio.to_thread(stack.down, ["promotions"])
    await asyncio.to_thread(stack.up, ["promotions"])


async def inject_fault(
    name: str, args: argparse.Namespace, stack: Stack, bank: Bank, deadline: float
) -> list[str]:
    """Break what the drill breaks, while the clients top up, and bring it back."""
    notes: list[str] = []
    if name == "bank-hang":
        await asyncio.sleep(args.hang)
        await bank.slow()
        say(f"bank answers again after {args.hang:.0f}s")
    elif name == "promotions-sigkill":
        while time.monotonic() < deadline:
            if not stack.status()["promotions"].running:
                break
            await asyncio.sleep(0.1)
        say("promotions killed itself between a charge and its confirmation")
        await restart_promotions(stack, hook=False)
        say("promotions restarted without the hook")
    elif name == "bank-down":
        await asyncio.sleep(args.fault_after)
        await asyncio.to_thread(stack.stop, "payments")
        say(f"bank stopped for {args.bank_outage:.0f}s")
        await asyncio.sleep(args.bank_outage)
        await asyncio.to_thread(stack.up, ["payments"])
        await bank.slow()  # its run-wide faults went with the process
        say("bank back")
    elif name == "postgres-topups":
        await asyncio.sleep(args.fault_after)
        await asyncio.to_thread(stack.stop, "postgres")
        say(f"postgres stopped for {args.outage:.0f}s")
        await asyncio.sleep(args.outage)
        await asyncio.to_thread(stack.up, ["postgres"])
        dead = [s for s, status in stack.status().items() if not status.running]
        if dead:
            notes.append(f"restarted {dead}")
            await asyncio.to_thread(stack.up, dead)
        say("postgres back")
    return notes


async def run_topup_drill(
    name: str, args: argparse.Namespace, stack: Stack, admin: str
) -> TopupDrillResult:
    say(f"--- top-up drill: {name}, {args.topup_users} users, bank delay {BANK_DELAY_MS} ms ---")
    promotions = service_database(stack, "promotions")
    ledger = service_database(stack, "payments")
    bank = Bank(stack)
    began = time.monotonic()
    deadline = began + args.topup_timeout
    async with Gateway(stack.gateway_url, concurrency=max(args.topup_users, 8)) as gateway:
        clients = await vouchers_for(
            gateway, promotions, admin, args.topup_users, deadline=deadline
        )
        user_ids = [client.user.user_id for client in clients]
        say(f"{len(clients)} users hold a voucher")
        await bank.slow()
        if name == "promotions-sigkill":
            await restart_promotions(stack, hook=True)
            say("promotions restarted with its kill-after-charge hook")
        spread = 0.0 if name == "bank-hang" else args.spread

        async def staggered(index: int, client: Client) -> None:
            await asyncio.sleep(spread * index / max(len(clients), 1))
            await top_up_until_done(gateway, client, deadline)

        if name == "bank-hang":
            await bank.faults(payments_pb2.FaultRule(fault=payments_pb2.FAULT_HANG))
            say("bank hangs")
        traffic = asyncio.gather(*(staggered(i, c) for i, c in enumerate(clients)))
        notes = await inject_fault(name, args, stack, bank, deadline)
        await traffic
        say(f"clients done in {time.monotonic() - began:.1f}s; waiting for the reconciler")
        while time.monotonic() < deadline:
            if await pending_of(promotions, user_ids) == 0:
                break
            await asyncio.sleep(0.5)
        await bank.faults()
    charges, succeeded, doubles, unrecorded, reserved, pending = await count(
        promotions, ledger, user_ids
    )
    await promotions.dispose()
    await ledger.dispose()
    latencies = [c.done_ms for c in clients if c.done_ms is not None]
    result = TopupDrillResult(
        drill=name,
        users=len(clients),
        topups_done=len(latencies),
        charges=charges,
        succeeded=succeeded,
        double_charges=doubles,
        unrecorded_charges=unrecorded,
        vouchers_reserved=reserved,
        pending_left=pending,
        p99_ms=round(percentile(latencies, 0.99), 1) if latencies else None,
        p50_ms=round(percentile(latencies, 0.50), 1) if latencies else None,
        attempts=sum(c.attempts for c in clients),
        seconds=round(time.monotonic() - began, 1),
        notes=notes,
    )
    say(f"top-up drill {name}: {'PASS' if result.passed else 'FAIL'} {result}")
    return result


def topup_report_lines(results: list[TopupDrillResult]) -> list[str]:
    lines = [
        "",
        "## Top-up drills",
        "",
        f"Bank delay {BANK_DELAY_MS} ms on every charge; P99/P50 = the successful attempt.",
        "",
        "| drill | users | top-ups done | charges | succeeded | double | unrecorded |"
        " reserved after | pending after | P99 ms | P50 ms | attempts | s | result |",
        "|" + "---|" * 14,
    ]
    for r in results:
        lines.append(
            f"| {r.drill} | {r.users} | {r.topups_done} | {r.charges} | {r.succeeded} |"
            f" {r.double_charges} | {r.unrecorded_charges} | {r.vouchers_reserved} |"
            f" {r.pending_left} | {r.p99_ms} | {r.p50_ms} | {r.attempts} | {r.seconds} |"
            f" {'PASS' if r.passed else '**FAIL**'} |"
        )
    return lines
