"""``make chaos``: fault drills during a first-login burst; lost and doubled vouchers must be 0.

Per drill: register N users, open a campaign with room for all of them, let them all log in
(clients retry until their login succeeds, as a real app would), and mid-burst break one
component, wait ``--outage`` seconds, bring it back with ``Stack.up([name])``. Then wait for
the vouchers and count, for the burst's users only:

- written:     USER_FIRST_LOGIN rows in auth's outbox (distinct event ids);
- published:   those rows marked published, and the records on ``cake.auth.user.v1``
               (a re-publication after a crash shows up as a Kafka duplicate, by ``ce_id``);
- consumed:    those event ids in promotions' inbox;
- lost:        written but never consumed;
- vouchers:    issued for the drill's campaign vs expected (= N), doubled = issued - holders;
- recovery:    seconds from the restart until the last expected voucher was there.

Drills (in order): SIGKILL events (the relay), SIGKILL promotions (the consumer), SIGKILL
Kafka, stop Postgres, stop Redis; then the top-up drills of ``topup_drills.py`` (bank hangs,
promotions SIGKILLed between charge and confirm, bank down 10 s, Postgres stopped during
top-ups). Default profile ``dev``; never point it at the test stack while a test run may be
using it. The gateway's rate limits must be raised (``CAKE_GATEWAY_PROFILE=bench``).

    uv run python bench/chaos.py                       # all drills, dev stack
    uv run python bench/chaos.py --drills events,redis --users 40 --outage 2
    uv run python bench/chaos.py --drills bank-hang,promotions-sigkill --topup-users 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.client import AIOKafkaClient
from benchlib import (
    RESULTS_DIR,
    Gateway,
    SeededUser,
    admin_token_via_cli,
    check_stack,
    require_raised_limits,
    say,
    service_database,
    voucher_counts,
)
from cake.events.v1 import registry
from cake_devtools.stack import Stack
from sqlalchemy.ext.asyncio import AsyncEngine
from topup_drills import TOPUP_DRILLS, TopupDrillResult, run_topup_drill, topup_report_lines

USER_EVENTS_TOPIC = registry.USER_FIRST_LOGIN.topic
SERVICES = ("auth", "promotions", "events")
DRILLS: dict[str, str] = {
    "events": "kill",
    "promotions": "kill",
    "kafka": "kill",
    "postgres": "stop",
    "redis": "stop",
}


@dataclass
class DrillResult:
    drill: str
    fault: str
    users: int
    logins_ok: int
    login_attempts_failed: int
    events_written: int
    events_published: int
    kafka_records: int
    kafka_duplicates: int
    events_consumed: int
    events_lost: int
    vouchers_expected: int
    vouchers_issued: int
    vouchers_doubled: int
    vouchers_lost: int
    vouchers_before_restart: int | None
    seconds_to_recover: float | None
    also_restarted: list[str]

    @property
    def passed(self) -> bool:
        return self.vouchers_lost == 0 and self.vouchers_doubled == 0 and self.events_lost == 0


async def kafka_end_offsets(bootstrap: str) -> dict[int, int]:
    """End offset of every partition of the user-events topic."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        metadata = await client.fetch_all_metadata()
        numbers = sorted(metadata.partitions_for_topic(USER_EVENTS_TOPIC) or set())
    finally:
        await client.close()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(USER_EVENTS_TOPIC, p) for p in numbers])
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await consumer.stop()


async def kafka_records_for(
    bootstrap: str, start: dict[int, int], user_ids: set[str]
) -> tuple[int, int]:
    """(records, distinct ce_id) on the user-events topic since ``start`` for these users."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    records = 0
    event_ids: set[bytes] = set()
    try:
        partitions = [TopicPartition(USER_EVENTS_TOPIC, p) for p in start]
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        for tp in partitions:
            consumer.seek(tp, start[tp.partition])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            positions = [await consumer.position(tp) for tp in partitions]
            if all(
                position >= ends[tp] for position, tp in zip(positions, partitions, strict=True)
            ):
                break
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                for message in messages:
                    if message.key is None or message.key.decode() not in user_ids:
                        continue
                    records += 1
                    headers = dict(message.headers or ())
                    event_ids.add(headers.get(registry.EVENT_ID_HEADER, b""))
    finally:
        # aiokafka's stop() of a manually assigned consumer re-raises the CancelledError of
        # its own internal task; nothing cancelled us, so it is safe to swallow here.
        with contextlib.suppress(asyncio.CancelledError):
            await consumer.stop()
    return records, len(event_ids)


async def outbox_counts(auth: AsyncEngine, user_ids: list[str]) -> tuple[list[str], int]:
    async with auth.connect() as connection:
        rows = (
            await connection.execute(
                sa.text(
                    "SELECT event_id::text, published_at IS NOT NULL FROM outbox"
                    " WHERE event_type = :event_type AND aggregate_id = ANY(:ids)"
                ),
                {"event_type": registry.USER_FIRST_LOGIN.name, "ids": user_ids},
            )
        ).all()
    return [str(row[0]) for row in rows], sum(1 for row in rows if row[1])


async def inbox_count(promotions: AsyncEngine, event_ids: list[str]) -> int:
    async with promotions.connect() as connection:
        value = await connection.scalar(
            sa.text("SELECT count(DISTINCT event_id) FROM inbox WHERE event_id::text = ANY(:ids)"),
            {"ids": event_ids},
        )
    return int(value or 0)


async def voucher_counts_or_none(
    promotions: AsyncEngine, campaign_id: int
) -> tuple[int | None, int | None]:
    """Voucher counts, or (None, None) while the database itself is the thing that is down."""
    try:
        return await asyncio.wait_for(voucher_counts(promotions, campaign_id), 2)
    except (OSError, TimeoutError, sa.exc.SQLAlchemyError):
        return None, None


async def login_until_ok(
    gateway: Gateway, user: SeededUser, gate: asyncio.Semaphore, deadline: float
) -> int:
    """Log in, retrying any failure (503 while a dependency is down...); failed attempts."""
    failed = 0
    while time.monotonic() < deadline:
        async with gate:
            try:
                response = await gateway.call(
                    "POST",
                    "/auth/login",
                    body={"account": user.username, "password": user.password},
                )
                if response.status_code == 200:
                    return failed
            except httpx.HTTPError:
                pass
        failed += 1
        await asyncio.sleep(0.3)
    raise RuntimeError(f"user {user.username} could not log in before the deadline")


async def run_drill(
    name: str, args: argparse.Namespace, stack: Stack, admin: str, out: Path
) -> DrillResult:
    fault = DRILLS[name]
    say(f"--- drill: {fault} {name} during a first-login burst of {args.users} users ---")
    auth = service_database(stack, "auth")
    promotions = service_database(stack, "promotions")
    async with Gateway(stack.gateway_url, concurrency=args.parallel) as gateway:
        users = await gateway.register_many(args.users, "chaos", login_once=False)
        campaign = await gateway.create_campaign(
            admin, args.users, f"chaos {name} {datetime.now(UTC):%H:%M:%S}"
        )
        start_offsets = await kafka_end_offsets(stack.kafka_bootstrap)
        say(f"campaign {campaign}; burst starts; {fault} {name} in {args.fault_after:.1f}s")
        gate = asyncio.Semaphore(args.parallel)
        deadline = time.monotonic() + args.timeout
        burst = asyncio.gather(*(login_until_ok(gateway, user, gate, deadline) for user in users))
        await asyncio.sleep(args.fault_after)
        if fault == "kill":
            await asyncio.to_thread(stack.kill, name)
        else:
            await asyncio.to_thread(stack.stop, name)
        say(f"{name} {'killed' if fault == 'kill' else 'stopped'}; outage {args.outage:.1f}s")
        await asyncio.sleep(args.outage)
        _, holders_at_restart = await voucher_counts_or_none(promotions, campaign)
        restart_at = time.monotonic()
        await asyncio.to_thread(stack.up, [name])
        say(f"{name} back after {time.monotonic() - restart_at:.1f}s")
        also_restarted = [
            service
            for service, status in stack.status().items()
            if service in SERVICES and not status.running
        ]
        if also_restarted:
            say(f"WARNING: {also_restarted} did not survive; restarting them")
            await asyncio.to_thread(stack.up, also_restarted)
        failures = await burst
        say(f"all {len(users)} logins done ({sum(failures)} failed attempts retried)")
        recovered: float | None = None
        issued = holders = 0
        while time.monotonic() < deadline:
            issued, holders = await voucher_counts(promotions, campaign)
            if holders >= len(users):
                recovered = time.monotonic() - restart_at
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(args.settle)  # let any late duplicate show up before counting
        issued, holders = await voucher_counts(promotions, campaign)
        await gateway.end_campaign(admin, campaign)
    user_ids = [str(user.user_id) for user in users]
    event_ids, published = await outbox_counts(auth, user_ids)
    consumed = await inbox_count(promotions, event_ids)
    records, distinct = await kafka_records_for(stack.kafka_bootstrap, start_offsets, set(user_ids))
    await auth.dispose()
    await promotions.dispose()
    result = DrillResult(
        drill=name,
        fault="SIGKILL" if fault == "kill" else "stop",
        users=len(users),
        logins_ok=len(failures),
        login_attempts_failed=sum(failures),
        events_written=len(set(event_ids)),
        events_published=published,
        kafka_records=records,
        kafka_duplicates=records - distinct,
        events_consumed=consumed,
        events_lost=len(set(event_ids)) - consumed,
        vouchers_expected=len(users),
        vouchers_issued=issued,
        vouchers_doubled=issued - holders,
        vouchers_lost=len(users) - holders,
        vouchers_before_restart=holders_at_restart,
        seconds_to_recover=recovered,
        also_restarted=also_restarted,
    )
    say(f"drill {name}: {'PASS' if result.passed else 'FAIL'} {asdict(result)}")
    return result


def report(
    results: list[DrillResult], path: Path, topups: list[TopupDrillResult] | None = None
) -> None:
    header = (
        "| drill | fault | written | published | kafka records | kafka dups | consumed | lost |"
        " vouchers issued/expected | doubled | lost vouchers | vouchers when restarted |"
        " recover s | login retries | result |"
    )
    lines = [
        f"# Cake fault drills — {datetime.now(UTC):%Y-%m-%d %H:%M}Z",
        "",
        "Each drill: a first-login burst; the component is broken mid-burst and restarted.",
        "Lost = events written but never consumed; doubled = vouchers beyond one per user.",
        "Recover = seconds from the restart command (component back included) until every"
        " user holds a voucher; 'vouchers when restarted' shows how far the pipeline got"
        " during the outage.",
        "",
        header,
        "|" + "---|" * 15,
    ]
    for r in results:
        recover = f"{r.seconds_to_recover:.1f}" if r.seconds_to_recover is not None else "never"
        lines.append(
            f"| {r.drill} | {r.fault} | {r.events_written} | {r.events_published} |"
            f" {r.kafka_records} | {r.kafka_duplicates} | {r.events_consumed} | {r.events_lost} |"
            f" {r.vouchers_issued}/{r.vouchers_expected} | {r.vouchers_doubled} |"
            f" {r.vouchers_lost} |"
            f" {'db down' if r.vouchers_before_restart is None else r.vouchers_before_restart} |"
            f" {recover} | {r.login_attempts_failed} |"
            f" {'PASS' if r.passed else '**FAIL**'} |"
        )
    if not results:
        del lines[5:]  # top-up drills only
    lines += topup_report_lines(topups or [])
    path.write_text("\n".join(lines) + "\n")
    print()
    print("\n".join(lines[5:]))


async def drills(
    args: argparse.Namespace, out: Path
) -> tuple[list[DrillResult], list[TopupDrillResult]]:
    stack = Stack(args.profile, echo=None)
    check_stack(stack)
    require_raised_limits(stack, args.profile)
    admin = await asyncio.to_thread(admin_token_via_cli, stack, stack.gateway_url)
    results: list[DrillResult] = []
    topups: list[TopupDrillResult] = []
    for name in args.drills.split(","):
        if name in TOPUP_DRILLS:
            topups.append(await run_topup_drill(name, args, stack, admin))
        else:
            results.append(await run_drill(name, args, stack, admin, out))
        (out / "chaos.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
        (out / "topup-drills.json").write_text(json.dumps([asdict(r) for r in topups], indent=2))
    return results, topups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="dev", choices=["dev", "test"])
    every = (*DRILLS, *TOPUP_DRILLS)
    parser.add_argument(
        "--drills", default=",".join(every), help="comma list of " + ",".join(every)
    )
    parser.add_argument("--users", type=int, default=40, help="burst size per drill")
    parser.add_argument("--parallel", type=int, default=8, help="concurrent logins")
    parser.add_argument("--fault-after", type=float, default=0.5, help="seconds into the burst")
    parser.add_argument("--outage", type=float, default=3.0, help="seconds the component is down")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-drill deadline (s)")
    parser.add_argument("--settle", type=float, default=2.0, help="wait before final counts (s)")
    parser.add_argument("--out", type=Path, help="results directory (default: bench/results/…)")
    parser.add_argument("--topup-users", type=int, default=50, help="users per top-up drill")
    parser.add_argument("--spread", type=float, default=15.0, help="steady top-ups over (s)")
    parser.add_argument("--hang", type=float, default=8.0, help="how long the bank hangs (s)")
    parser.add_argument("--bank-outage", type=float, default=10.0, help="bank down for (s)")
    parser.add_argument(
        "--topup-timeout", type=float, default=240.0, help="per top-up drill deadline (s)"
    )
    args = parser.parse_args()
    unknown = set(args.drills.split(",")) - set(every)
    if unknown:
        parser.error(f"unknown drills: {sorted(unknown)}")
    out = args.out or RESULTS_DIR / f"chaos-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    out.mkdir(parents=True, exist_ok=True)
    results, topups = asyncio.run(drills(args, out))
    report(results, out / "chaos.md", topups)
    say(f"wrote {out / 'chaos.json'} and {out / 'chaos.md'}")
    passed = all(r.passed for r in results) and all(r.passed for r in topups)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
