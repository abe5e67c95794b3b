"""First-login burst: N users log in for the first time at a steady rate; how long from each
login's commit until its voucher is committed, through the whole pipeline.

Each "login" is the transaction the auth service commits on a first login minus the bcrypt
check (which caps real logins at ~34/s on a 2-core box): a USER_FIRST_LOGIN
row in auth's outbox. From there everything is real: relay (events service) → Kafka →
promotions consumer → enrolment and voucher. With ``--via kafka`` the envelopes are
published straight to the user-events topic instead (consumer alone, no relay).

Latency of one user = ``vouchers.issued_at - user_promotions.first_login_at`` (the login
time carried by the event, taken just before the login transaction commits; ``issued_at``
is taken after the campaign slot is won, just before the enrolment commits). The goal is
P99 < 250 ms at 100 logins/s; exactly ``min(N, max)`` vouchers must be issued.

Run with the stack up (``make up``; or ``--profile test`` against the test stack)::

    uv run python bench/first_login_burst.py --users 300 --rate 100 --max 100
    uv run python bench/first_login_burst.py --users 300 --rate 100 --via kafka

The benchmark creates its own campaign (newest, so it takes these logins), uses user ids far
above real ones, and ends the campaign afterwards. It prints numbers; it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from cake.events.v1 import envelope_pb2, payloads_pb2, registry
from cake_common.db import create_async_engine_for
from cake_common.kafka import create_producer, kafka_headers, start_with_retry
from cake_common.outbox import OutboxWriter
from cake_devtools.stack import service_environment
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncEngine

USER_EVENTS_TOPIC = registry.USER_FIRST_LOGIN.topic
USER_ID_BASE = 9_000_000_000_000


@dataclass(frozen=True)
class Login:
    user_id: int
    event_id: uuid.UUID


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    index = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def first_login_payload(user_id: int, login_at: datetime) -> payloads_pb2.UserFirstLogin:
    stamp = Timestamp()
    stamp.FromDatetime(login_at)
    return payloads_pb2.UserFirstLogin(user_id=user_id, login_at=stamp, user_agent="bench")


async def create_campaign(promotions: AsyncEngine, max_participants: int) -> int:
    now = datetime.now(UTC)
    async with promotions.begin() as connection:
        campaign_id: int = await connection.scalar(
            sa.text(
                "INSERT INTO promotion_campaigns (name, description, start_date, end_date,"
                " max_participants) VALUES (:name, 'first_login_burst benchmark', :start, :end,"
                " :max) RETURNING id"
            ),
            {
                "name": f"bench {now:%Y-%m-%d %H:%M:%S}",
                "start": now - timedelta(minutes=1),
                "end": now + timedelta(hours=1),
                "max": max_participants,
            },
        )
    return campaign_id


async def end_campaign(promotions: AsyncEngine, campaign_id: int) -> None:
    async with promotions.begin() as connection:
        await connection.execute(
            sa.text(
                "UPDATE promotion_campaigns SET status = 'expired', updated_at = now()"
                " WHERE id = :id"
            ),
            {"id": campaign_id},
        )


async def logins_via_outbox(auth: AsyncEngine, logins: Sequence[Login], rate: float) -> None:
    """One transaction per login, started on a fixed schedule (open loop: a slow commit does
    not delay the logins after it)."""
    writer = OutboxWriter()

    async def login(item: Login, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        async with auth.begin() as connection:
            login_at = datetime.now(UTC)
            await writer.add(
                connection,
                registry.USER_FIRST_LOGIN,
                aggregate_id=item.user_id,
                payload=first_login_payload(item.user_id, login_at),
                occurred_at=login_at,
                event_id=item.event_id,
            )

    start = time.monotonic() + 0.2
    await asyncio.gather(*(login(item, start + i / rate) for i, item in enumerate(logins)))


async def logins_via_kafka(bootstrap: str, logins: Sequence[Login], rate: float) -> None:
    producer = await start_with_retry(
        lambda: create_producer(bootstrap, "first-login-burst"), timeout_seconds=30
    )
    try:
        start = time.monotonic() + 0.2
        sends = []
        for i, item in enumerate(logins):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            login_at = datetime.now(UTC)
            payload = AnyMessage()
            payload.Pack(first_login_payload(item.user_id, login_at))
            occurred = Timestamp()
            occurred.FromDatetime(login_at)
            envelope = envelope_pb2.EventEnvelope(
                event_id=str(item.event_id),
                type=registry.USER_FIRST_LOGIN.name,
                occurred_at=occurred,
                aggregate_type=registry.USER_FIRST_LOGIN.aggregate_type,
                aggregate_id=str(item.user_id),
                payload=payload,
            )
            sends.append(
                await producer.send(
                    USER_EVENTS_TOPIC,
                    key=str(item.user_id).encode(),
                    value=envelope.SerializeToString(),
                    headers=kafka_headers(item.event_id, registry.USER_FIRST_LOGIN.name),
                )
            )
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


async def wait_until_applied(
    promotions: AsyncEngine, logins: Sequence[Login], timeout_seconds: float
) -> int:
    event_ids = [item.event_id for item in logins]
    deadline = time.monotonic() + timeout_seconds
    applied = 0
    while time.monotonic() < deadline:
        async with promotions.connect() as connection:
            applied = await connection.scalar(
                sa.text("SELECT count(*) FROM inbox WHERE event_id = ANY(:ids)"),
                {"ids": event_ids},
            )
        if applied >= len(logins):
            break
        await asyncio.sleep(0.25)
    return int(applied)


async def run(arguments: argparse.Namespace) -> None:
    environment = service_environment(arguments.profile)
    promotions = create_async_engine_for(
        environment["promotions"]["CAKE_PROMOTIONS_DATABASE_URL"], pool_size=2
    )
    auth = create_async_engine_for(
        environment["auth"]["CAKE_AUTH_DATABASE_URL"], pool_size=20, max_overflow=20
    )
    bootstrap = environment["promotions"]["CAKE_PROMOTIONS_KAFKA_BOOTSTRAP_SERVERS"]
    base = USER_ID_BASE + secrets.randbelow(10**9) * 1000
    logins = [Login(base + index, uuid.uuid4()) for index in range(arguments.users)]
    campaign_id = await create_campaign(promotions, arguments.max)
    try:
        began = time.monotonic()
        if arguments.via == "outbox":
            await logins_via_outbox(auth, logins, arguments.rate)
        else:
            await logins_via_kafka(bootstrap, logins, arguments.rate)
        sent_in = time.monotonic() - began
        applied = await wait_until_applied(promotions, logins, arguments.timeout)
        drained_in = time.monotonic() - began

        async with promotions.connect() as connection:
            rows = (
                await connection.execute(
                    sa.text(
                        "SELECT extract(epoch FROM v.issued_at - p.first_login_at) * 1000"
                        " FROM vouchers v JOIN user_promotions p ON p.id = v.user_promotion_id"
                        " WHERE p.campaign_id = :id"
                    ),
                    {"id": campaign_id},
                )
            ).scalars()
            latencies = sorted(float(value) for value in rows)
            full = await connection.scalar(
                sa.text("SELECT current_participants FROM promotion_campaigns WHERE id = :id"),
                {"id": campaign_id},
            )
        relay_lags: list[float] = []
        if arguments.via == "outbox":
            async with auth.connect() as connection:
                lag_rows = (
                    await connection.execute(
                        sa.text(
                            "SELECT extract(epoch FROM published_at - occurred_at) * 1000"
                            " FROM outbox WHERE event_id = ANY(:ids) AND published_at IS NOT NULL"
                        ),
                        {"ids": [item.event_id for item in logins]},
                    )
                ).scalars()
                relay_lags = sorted(float(value) for value in lag_rows)
    finally:
        await end_campaign(promotions, campaign_id)
        await promotions.dispose()
        await auth.dispose()

    expected = min(arguments.users, arguments.max)
    print(
        f"first-login burst via {arguments.via}: {arguments.users} logins at "
        f"{arguments.rate:g}/s (sent in {sent_in:.2f} s, all applied after {drained_in:.2f} s)"
    )
    print(f"events applied by promotions: {applied}/{arguments.users}")
    verdict = "OK" if len(latencies) == expected and full == expected else "MISMATCH"
    print(
        f"vouchers issued: {len(latencies)} (expected min(N, max) = {expected}); "
        f"campaign participants {full} -> {verdict}"
    )
    if latencies:
        print(
            "login commit -> voucher commit (ms): "
            f"p50 {percentile(latencies, 0.50):.1f}  p95 {percentile(latencies, 0.95):.1f}  "
            f"p99 {percentile(latencies, 0.99):.1f}  max {latencies[-1]:.1f}  "
            f"mean {statistics.fmean(latencies):.1f}  (goal p99 < 250 at 100 logins/s)"
        )
    if relay_lags:
        print(
            "  of which login commit -> relay published (ms): "
            f"p50 {percentile(relay_lags, 0.50):.1f}  p99 {percentile(relay_lags, 0.99):.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=300, help="first logins (N)")
    parser.add_argument("--rate", type=float, default=100.0, help="logins per second")
    parser.add_argument("--max", type=int, default=100, help="campaign max participants")
    parser.add_argument("--via", choices=("outbox", "kafka"), default="outbox")
    parser.add_argument("--profile", default="dev", help="stack profile (dev or test)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for all")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
