"""Notifications benchmark and SMTP drill: first logins at a steady rate become vouchers, and
each voucher an e-mail in the stack's SMTP sink and an entry in the user's list. How long
from the voucher's commit until its e-mail was handed to the SMTP server, and until its
entry existed; and, with ``--stop-sink-seconds``, whether an SMTP outage during the burst
loses or doubles anything.

Setup: ``--users`` accounts are written straight into auth's users table (registering through
the API would spend most of the run on bcrypt), then their first logins go into auth's
outbox at ``--rate`` per second, exactly as ``bench/first_login_burst.py`` writes them
(the transaction auth commits on a first login, minus the password check). From there
everything is the real pipeline: relay → Kafka → promotions (voucher + VOUCHER_ISSUED in its
outbox, one transaction) → relay → Kafka → notifications (inbox, entry, deliveries) →
contacts from auth over gRPC → SMTP → the sink.

Latency of one user = ``deliveries.sent_at - notifications.created_at`` for the e-mail
(``created_at`` is the voucher's ``issued_at``, carried by the event), and
``inbox.processed_at - notifications.created_at`` for the in-app entry, all from the
notifications database. Every user must get exactly one e-mail in the sink (counted by the
``To`` header of the stored messages) and one entry.

Run with the stack up (``make up``)::

    uv run python bench/notifications.py --users 500 --rate 50
    uv run python bench/notifications.py --users 500 --rate 50 --stop-sink-seconds 10

Exit 0 when every e-mail arrived exactly once and P99 of the e-mail latency is under
``--p99-ms`` (1000), 1 otherwise, 2 when the run itself failed (stack down...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
import uuid
from collections import Counter
from datetime import timedelta
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cake_common.db import create_async_engine_for
from cake_devtools.stack import Stack, service_environment
from first_login_burst import (
    BenchError,
    Login,
    create_campaign,
    end_campaign,
    logins_via_outbox,
    run_or_explain,
    summary,
)
from sqlalchemy.ext.asyncio import AsyncEngine


async def seed_users(auth: AsyncEngine, count: int, tag: str) -> list[tuple[int, str]]:
    """``count`` accounts (no usable password); their ids and e-mail addresses."""
    rows = [
        {
            "fullname": f"Bench {tag} {index}",
            "email": f"bench.{tag}.{index}@example.com",
            "username": f"bench_{tag}_{index}",
            "phone": f"+8499{secrets.randbelow(10**9):09d}{index}",
        }
        for index in range(count)
    ]
    async with auth.begin() as connection:
        result = await connection.execute(
            sa.text(
                "INSERT INTO users (fullname, email, username, phone, password_hash)"
                " SELECT * , 'x' FROM unnest(CAST(:f AS text[]), CAST(:e AS text[]),"
                " CAST(:u AS text[]), CAST(:p AS text[])) RETURNING id, email"
            ),
            {
                "f": [r["fullname"] for r in rows],
                "e": [r["email"] for r in rows],
                "u": [r["username"] for r in rows],
                "p": [r["phone"] for r in rows],
            },
        )
        return [(int(row[0]), str(row[1])) for row in result]


async def delivered(notifications: AsyncEngine, user_ids: list[int]) -> int:
    async with notifications.connect() as connection:
        count = await connection.scalar(
            sa.text(
                "SELECT count(*) FROM deliveries d JOIN notifications n ON n.id = d.notification_id"
                " WHERE n.user_id = ANY(:ids) AND n.kind = 'voucher_issued'"
                " AND d.channel = 'email' AND d.status = 'sent'"
            ),
            {"ids": user_ids},
        )
    return int(count or 0)


async def latencies(notifications: AsyncEngine, user_ids: list[int]) -> dict[str, list[float]]:
    async with notifications.connect() as connection:
        email = (
            await connection.execute(
                sa.text(
                    "SELECT extract(epoch FROM d.sent_at - n.created_at) * 1000,"
                    " d.attempts FROM deliveries d JOIN notifications n"
                    " ON n.id = d.notification_id WHERE n.user_id = ANY(:ids)"
                    " AND n.kind = 'voucher_issued' AND d.channel = 'email'"
                ),
                {"ids": user_ids},
            )
        ).all()
        entry = (
            await connection.execute(
                sa.text(
                    "SELECT extract(epoch FROM i.processed_at - n.created_at) * 1000"
                    " FROM notifications n JOIN inbox i ON i.event_id = n.event_id"
                    " WHERE n.user_id = ANY(:ids) AND n.kind = 'voucher_issued'"
                ),
                {"ids": user_ids},
            )
        ).scalars()
        return {
            "email_ms": [float(row[0]) for row in email],
            "attempts": [float(row[1]) for row in email],
            "entry_ms": [float(value) for value in entry],
        }


async def stages(
    promotions: AsyncEngine, notifications: AsyncEngine, user_ids: list[int], lease_seconds: float
) -> dict[str, list[float]]:
    """Where the time went, per e-mail (ms): voucher commit → published by the relay
    (promotions' outbox ``published_at``) → stored by the notifications consumer
    (``inbox.processed_at``) → claimed (the delivery's due time after its last claim, minus
    the lease: in the consumer's own commit when it handed the delivery over, else by a
    dispatch loop) → handed to the SMTP server (``sent_at``: when the server took it)."""
    async with notifications.connect() as connection:
        rows = (
            await connection.execute(
                sa.text(
                    "SELECT n.event_id, n.created_at, i.processed_at, d.due_at, d.sent_at"
                    " FROM notifications n JOIN inbox i ON i.event_id = n.event_id"
                    " JOIN deliveries d ON d.notification_id = n.id AND d.channel = 'email'"
                    " WHERE n.user_id = ANY(:ids) AND n.kind = 'voucher_issued'"
                    " AND d.status = 'sent'"
                ),
                {"ids": user_ids},
            )
        ).all()
    async with promotions.connect() as connection:
        published = dict(
            (
                await connection.execute(
                    sa.text("SELECT event_id, published_at FROM outbox WHERE event_id = ANY(:ids)"),
                    {"ids": [row[0] for row in rows]},
                )
            ).all()
        )
    out: dict[str, list[float]] = {"published": [], "stored": [], "claimed": [], "sent": []}
    lease = timedelta(seconds=lease_seconds)
    for event_id, created, processed, due, sent in rows:
        relayed = published.get(event_id)
        if relayed is None:
            continue
        claimed = due - lease
        for name, start, end in (
            ("published", created, relayed),
            ("stored", relayed, processed),
            ("claimed", processed, claimed),
            ("sent", claimed, sent),
        ):
            out[name].append((end - start).total_seconds() * 1000)
    return out


def sink_counts(mail_dir: Path, addresses: set[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for path in mail_dir.glob("*.eml"):
        message = message_from_bytes(path.read_bytes(), policy=default_policy)
        if (to := str(message["To"])) in addresses:
            counts[to] += 1
    return counts


async def run(
    profile: str, users: int, rate: float, stop_sink_seconds: float, wait_seconds: float
) -> dict[str, Any]:
    environment = service_environment(profile)
    auth_url = environment["auth"]["CAKE_AUTH_DATABASE_URL"]
    auth = create_async_engine_for(auth_url, pool_size=1)
    promotions = create_async_engine_for(
        environment["promotions"]["CAKE_PROMOTIONS_DATABASE_URL"], pool_size=1
    )
    notifications = create_async_engine_for(
        environment["notifications"]["CAKE_NOTIFICATIONS_DATABASE_URL"], pool_size=1
    )
    stack = Stack(profile, echo=None)
    tag = uuid.uuid4().hex[:8]
    try:
        seeded = await seed_users(auth, users, tag)
        ids = [user_id for user_id, _ in seeded]
        campaign_id = await create_campaign(promotions, users)
        try:
            logins = [Login(user_id, uuid.uuid4()) for user_id in ids]
            drill: asyncio.Task[None] | None = None
            if stop_sink_seconds:

                async def outage() -> None:
                    await asyncio.sleep(min(2.0, users / rate / 4))
                    await asyncio.to_thread(stack.down, ["smtp-sink"])
                    await asyncio.sleep(stop_sink_seconds)
                    await asyncio.to_thread(stack.up, ["smtp-sink"])

                drill = asyncio.create_task(outage())
            began = time.monotonic()
            writer = await logins_via_outbox(auth_url, logins, rate, writers=2)
            if drill is not None:
                await drill
            deadline = time.monotonic() + wait_seconds
            while (done := await delivered(notifications, ids)) < users:
                if time.monotonic() > deadline:
                    raise BenchError(f"only {done} of {users} e-mails sent within {wait_seconds}s")
                await asyncio.sleep(0.5)
            drained = time.monotonic() - began
        finally:
            await end_campaign(promotions, campaign_id)
        await asyncio.sleep(2)  # a duplicate would have landed by now
        measured = await latencies(notifications, ids)
        lease = float(
            environment["notifications"].get("CAKE_NOTIFICATIONS_DISPATCH_LEASE_SECONDS", 60)
        )
        steps = await stages(promotions, notifications, ids, lease)
        counts = sink_counts(stack.mail_dir, {email for _, email in seeded})
    finally:
        for engine in (auth, promotions, notifications):
            await engine.dispose()
    return {
        "users": users,
        "asked_rate": rate,
        "reached_rate": round(writer.reached_rate, 1),
        "writer_kept_rate": writer.kept_rate,
        "sink_stopped_seconds": stop_sink_seconds,
        "drained_seconds": round(drained, 2),
        "email_ms": summary(measured["email_ms"]),
        "entry_ms": summary(measured["entry_ms"]),
        "stages_ms": {name: summary(values) for name, values in steps.items()},
        "load_average": [f"{value:.2f}" for value in os.getloadavg()],
        "max_attempts": max(measured["attempts"], default=0),
        "emails_in_sink": sum(counts.values()),
        "users_without_email": users - len(counts),
        "users_with_duplicates": sum(1 for count in counts.values() if count > 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="dev", choices=("dev", "test"))
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--rate", type=float, default=50.0, help="first logins per second")
    parser.add_argument("--stop-sink-seconds", type=float, default=0.0)
    parser.add_argument("--p99-ms", type=float, default=1000.0)
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.users < 1 or args.rate <= 0:
        raise SystemExit("--users and --rate must be positive")
    result = run_or_explain(
        run(args.profile, args.users, args.rate, args.stop_sink_seconds, args.timeout)
    )
    email, entry = result["email_ms"], result["entry_ms"]
    print(
        f"notifications: {result['users']} first logins at {result['reached_rate']}/s"
        f" (asked {result['asked_rate']}/s"
        + (
            f", SMTP sink stopped {result['sink_stopped_seconds']:g}s"
            if args.stop_sink_seconds
            else ""
        )
        + ")"
    )
    print(
        f"  voucher commit → e-mail sent: p50 {email['p50']:.0f} ms, p95 {email['p95']:.0f} ms,"
        f" p99 {email['p99']:.0f} ms, max {email['max']:.0f} ms"
    )
    print(f"  voucher commit → in-app entry: p50 {entry['p50']:.0f} ms, p99 {entry['p99']:.0f} ms")
    labels = {
        "published": "voucher commit → relayed to Kafka",
        "stored": "relayed → stored by the consumer",
        "claimed": "stored → claimed (at the commit, or by a loop)",
        "sent": "claimed → handed to SMTP",
    }
    for name, label in labels.items():
        if step := result["stages_ms"][name]:
            print(f"    {label}: p50 {step['p50']:.0f} ms, p99 {step['p99']:.0f} ms")
    print(f"  load average at the end: {' '.join(result['load_average'])} (the box may be shared)")
    print(
        f"  e-mails in the sink: {result['emails_in_sink']} for {result['users']} users;"
        f" missing {result['users_without_email']}, duplicated"
        f" {result['users_with_duplicates']}; most attempts {result['max_attempts']:.0f}"
    )
    if args.json:
        print(json.dumps(result, indent=2))
    exactly_once = result["users_without_email"] == 0 and result["users_with_duplicates"] == 0
    fast = args.stop_sink_seconds > 0 or email["p99"] < args.p99_ms
    sys.exit(0 if exactly_once and fast else 1)


if __name__ == "__main__":
    main()
