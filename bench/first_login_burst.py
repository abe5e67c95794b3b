"""First-login burst: N users log in for the first time at a steady rate; how long from each
login's commit until its voucher is committed, through the whole pipeline.

Each "login" is the transaction the auth service commits on a first login minus the bcrypt
check (which caps real logins at ~34/s on a 2-core box): a USER_FIRST_LOGIN row in auth's
outbox, one autocommitted statement per login. From there everything is real: relay (events
service) → Kafka → promotions consumer → enrollment and voucher. With ``--via kafka`` the
envelopes are published straight to the user-events topic instead (consumer alone, no relay).

The writer is ``--writers`` plain psycopg connections taking the logins off one open-loop
schedule (login i is due at start + i / rate; a slow commit does not delay the others). It
says so plainly, and exits 3, when it could not keep the asked rate (on a busy box); any
other failure (stack down, …) is one line and exit 2, never a traceback.

The login statements do not NOTIFY the relay each (auth's ``OutboxWriter.add`` does):
PostgreSQL serialises the commits of notifying transactions on one cluster-wide lock held
through the WAL flush, which alone capped this writer at ~450-600 logins/s on this box with
fsync on (``docs/enrollment.md``). A separate connection notifies every ``--notify-ms``
(5 ms) instead, when something was written; ``--notify per-login`` restores auth's way.

Latency of one user = ``vouchers.issued_at - user_promotions.first_login_at`` (the login
time carried by the event, taken just before the login statement; ``issued_at`` is taken
once the campaign slots are won, just before the enrollment commits); for users told the
campaign is full, ``first_login_decisions.decided_at - login_at``. Exactly ``min(N, max)``
vouchers must be issued, with participation orders 1..min(N, max) (gaps are reported).

Run with the stack up (``make up``; or ``--profile test`` against the test stack)::

    uv run python bench/first_login_burst.py --users 300 --rate 100 --max 100
    uv run python bench/first_login_burst.py --users 30000 --rate 1000 --max 1000
    uv run python bench/first_login_burst.py --users 300 --rate 100 --via kafka

The benchmark creates its own campaign (newest, so it takes these logins), uses user ids far
above real ones, and ends the campaign afterwards. Exit 0 when the counts are right (it does
not judge latency: ``bench/enrollment.py`` does), 1 when they are wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import sqlalchemy as sa
import sqlalchemy.exc
from aiokafka.errors import KafkaError
from cake.events.v1 import envelope_pb2, payloads_pb2, registry
from cake_common.db import create_async_engine_for, libpq_url
from cake_common.kafka import create_producer, kafka_headers, start_with_retry
from cake_common.outbox import OUTBOX_NOTIFY_CHANNEL
from cake_devtools.stack import service_environment
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncEngine

FIRST_LOGIN = registry.USER_FIRST_LOGIN
USER_EVENTS_TOPIC = FIRST_LOGIN.topic
USER_ID_BASE = 9_000_000_000_000
USER_ID_SPAN = 10**6
"""Users of one run: ``base .. base + N - 1``, N at most this."""
BEHIND_TOLERANCE_SECONDS = 0.5
"""The writer "kept the rate" if no login started later than this after its due time and
the whole schedule was sent within this of its planned length."""

_INSERT_LOGIN = """
INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, payload,
                    payload_type, occurred_at)
VALUES (%(event_id)s, %(event_type)s, %(aggregate_type)s, %(aggregate_id)s, %(payload)s,
        %(payload_type)s, %(occurred_at)s)
"""
_NOTIFY = f"SELECT pg_notify('{OUTBOX_NOTIFY_CHANNEL}', current_database())"
_INSERT_LOGIN_AND_NOTIFY = _INSERT_LOGIN + _NOTIFY.replace("SELECT", "RETURNING")


class BenchError(Exception):
    """Something the benchmark cannot do, said in one line."""


@dataclass(frozen=True)
class Login:
    user_id: int
    event_id: uuid.UUID


@dataclass
class WriterStats:
    asked_rate: float
    logins: int
    seconds: float = 0.0
    max_behind_ms: float = 0.0

    @property
    def reached_rate(self) -> float:
        return self.logins / self.seconds if self.seconds else 0.0

    @property
    def kept_rate(self) -> bool:
        if not self.asked_rate:
            return True  # as fast as it goes: nothing to keep
        planned = self.logins / self.asked_rate
        return (
            self.max_behind_ms <= BEHIND_TOLERANCE_SECONDS * 1000
            and self.seconds <= planned + BEHIND_TOLERANCE_SECONDS
        )


@dataclass
class BurstResult:
    via: str
    users: int
    max_participants: int
    asked_rate: float
    reached_rate: float
    writer_kept_rate: bool
    writer_max_behind_ms: float
    sent_seconds: float
    applied: int
    drained_seconds: float
    applied_after_last_login_seconds: float
    consumer_rate: float
    """Events decided per second, from the first decision to the last."""
    vouchers: int
    expected_vouchers: int
    participants: int
    order_gaps: int
    order_repeats: int
    told_full: int
    voucher_ms: dict[str, float] = field(default_factory=dict)
    decision_ms: dict[str, float] = field(default_factory=dict)
    relay_ms: dict[str, float] = field(default_factory=dict)

    @property
    def correct(self) -> bool:
        return (
            self.applied == self.users
            and self.vouchers == self.expected_vouchers
            and self.participants == self.expected_vouchers
            and self.order_gaps == 0
            and self.order_repeats == 0
            and self.told_full == self.users - self.expected_vouchers
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "correct": self.correct}


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    index = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def summary(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    return {
        "p50": round(percentile(ordered, 0.50), 1),
        "p95": round(percentile(ordered, 0.95), 1),
        "p99": round(percentile(ordered, 0.99), 1),
        "max": round(ordered[-1], 1),
        "count": len(ordered),
    }


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


async def logins_via_outbox(
    auth_url: str,
    logins: Sequence[Login],
    rate: float,
    writers: int,
    *,
    notify_ms: float | None = 5.0,
) -> WriterStats:
    """One autocommitted outbox insert per login (what auth's login transaction adds), on
    ``writers`` connections taking the logins in schedule order; the relay is notified
    every ``notify_ms`` by another connection (``None``: by each insert, as auth does)."""
    stats = WriterStats(rate, len(logins))
    try:
        connections = [
            await psycopg.AsyncConnection.connect(libpq_url(auth_url), autocommit=True)
            for _ in range(writers + 1)
        ]
    except psycopg.OperationalError as error:
        raise BenchError(f"cannot connect to auth's database: {error}".strip()) from None
    notifier, connections = connections[0], connections[1:]
    schedule = iter(enumerate(logins))
    start = time.monotonic() + 0.2
    insert = _INSERT_LOGIN if notify_ms is not None else _INSERT_LOGIN_AND_NOTIFY
    written = asyncio.Event()
    done = asyncio.Event()

    async def notify() -> None:
        assert notify_ms is not None
        while not done.is_set():
            await written.wait()
            written.clear()
            await notifier.execute(_NOTIFY)
            await asyncio.sleep(notify_ms / 1000)

    async def writer(connection: psycopg.AsyncConnection[Any]) -> None:
        for index, item in schedule:
            behind = time.monotonic() - (start + (index / rate if rate else 0.0))
            if behind < 0:
                await asyncio.sleep(-behind)
            else:
                stats.max_behind_ms = max(stats.max_behind_ms, behind * 1000)
            login_at = datetime.now(UTC)
            payload = first_login_payload(item.user_id, login_at).SerializeToString()
            await connection.execute(
                insert,
                {
                    "event_id": item.event_id,
                    "event_type": FIRST_LOGIN.name,
                    "aggregate_type": FIRST_LOGIN.aggregate_type,
                    "aggregate_id": str(item.user_id),
                    "payload": payload,
                    "payload_type": FIRST_LOGIN.payload_type,
                    "occurred_at": login_at,
                },
            )
            written.set()

    notifying = asyncio.create_task(notify()) if notify_ms is not None else None
    try:
        await asyncio.gather(*(writer(connection) for connection in connections))
        stats.seconds = time.monotonic() - start
    finally:
        done.set()
        written.set()
        if notifying is not None:
            await notifying
        for connection in (notifier, *connections):
            await connection.close()
    return stats


async def logins_via_kafka(bootstrap: str, logins: Sequence[Login], rate: float) -> WriterStats:
    stats = WriterStats(rate, len(logins))
    producer = await start_with_retry(
        lambda: create_producer(bootstrap, "first-login-burst"), timeout_seconds=30
    )
    try:
        start = time.monotonic() + 0.2
        sends = []
        for i, item in enumerate(logins):
            behind = time.monotonic() - (start + (i / rate if rate else 0.0))
            if behind < 0:
                await asyncio.sleep(-behind)
            else:
                stats.max_behind_ms = max(stats.max_behind_ms, behind * 1000)
            login_at = datetime.now(UTC)
            payload = AnyMessage()
            payload.Pack(first_login_payload(item.user_id, login_at))
            occurred = Timestamp()
            occurred.FromDatetime(login_at)
            envelope = envelope_pb2.EventEnvelope(
                event_id=str(item.event_id),
                type=FIRST_LOGIN.name,
                occurred_at=occurred,
                aggregate_type=FIRST_LOGIN.aggregate_type,
                aggregate_id=str(item.user_id),
                payload=payload,
            )
            sends.append(
                await producer.send(
                    USER_EVENTS_TOPIC,
                    key=str(item.user_id).encode(),
                    value=envelope.SerializeToString(),
                    headers=kafka_headers(item.event_id, FIRST_LOGIN.name),
                )
            )
        await asyncio.gather(*sends)
        stats.seconds = time.monotonic() - start
    finally:
        await producer.stop()
    return stats


async def decided_count(promotions: AsyncEngine, base: int, users: int) -> int:
    async with promotions.connect() as connection:
        decided = await connection.scalar(
            sa.text(
                "SELECT count(*) FROM first_login_decisions WHERE user_id BETWEEN :low AND :high"
            ),
            {"low": base, "high": base + users - 1},
        )
    return int(decided or 0)


async def wait_until_decided(
    promotions: AsyncEngine, base: int, users: int, timeout_seconds: float
) -> int:
    deadline = time.monotonic() + timeout_seconds
    decided = 0
    while time.monotonic() < deadline:
        decided = await decided_count(promotions, base, users)
        if decided >= users:
            break
        await asyncio.sleep(0.25)
    return decided


async def measure(
    promotions: AsyncEngine, auth: AsyncEngine | None, campaign_id: int, logins: Sequence[Login]
) -> dict[str, Any]:
    low, high = logins[0].user_id, logins[-1].user_id
    async with promotions.connect() as connection:
        voucher_ms = (
            await connection.execute(
                sa.text(
                    "SELECT extract(epoch FROM v.issued_at - p.first_login_at) * 1000"
                    " FROM vouchers v JOIN user_promotions p ON p.id = v.user_promotion_id"
                    " WHERE p.campaign_id = :id"
                ),
                {"id": campaign_id},
            )
        ).scalars()
        orders = list(
            (
                await connection.execute(
                    sa.text(
                        "SELECT participation_order FROM user_promotions WHERE campaign_id = :id"
                    ),
                    {"id": campaign_id},
                )
            ).scalars()
        )
        decisions = (
            await connection.execute(
                sa.text(
                    "SELECT result, extract(epoch FROM decided_at - login_at) * 1000,"
                    " extract(epoch FROM decided_at) FROM first_login_decisions"
                    " WHERE user_id BETWEEN :low AND :high"
                ),
                {"low": low, "high": high},
            )
        ).all()
        participants = await connection.scalar(
            sa.text("SELECT current_participants FROM promotion_campaigns WHERE id = :id"),
            {"id": campaign_id},
        )
    relay_ms: list[float] = []
    if auth is not None:
        async with auth.connect() as connection:
            relay_ms = list(
                (
                    await connection.execute(
                        sa.text(
                            "SELECT extract(epoch FROM published_at - occurred_at) * 1000"
                            " FROM outbox WHERE event_id = ANY(:ids) AND published_at IS NOT NULL"
                        ),
                        {"ids": [login.event_id for login in logins]},
                    )
                ).scalars()
            )
    decided_at = sorted(float(row[2]) for row in decisions)
    return {
        "voucher_ms": [float(value) for value in voucher_ms],
        "orders": orders,
        "decision_ms": [float(row[1]) for row in decisions],
        "told_full": sum(1 for row in decisions if row[0] == "campaign_full"),
        "decided_span": decided_at[-1] - decided_at[0] if len(decided_at) > 1 else 0.0,
        "last_decided_at": decided_at[-1] if decided_at else 0.0,
        "participants": int(participants or 0),
        "relay_ms": [float(value) for value in relay_ms],
    }


async def burst(
    profile: str,
    *,
    users: int,
    rate: float,
    max_participants: int,
    via: str = "outbox",
    writers: int = 8,
    notify_ms: float | None = 5.0,
    wait_seconds: float = 120.0,
) -> BurstResult:
    """Run one burst against the ``profile`` stack and measure it (raises ``BenchError``)."""
    if not 0 < users <= USER_ID_SPAN:
        raise BenchError(f"--users must be between 1 and {USER_ID_SPAN}")
    if rate < 0:
        raise BenchError("--rate must be positive (0: as fast as the writer goes)")
    environment = service_environment(profile)
    promotions = create_async_engine_for(
        environment["promotions"]["CAKE_PROMOTIONS_DATABASE_URL"], pool_size=2
    )
    auth_url = environment["auth"]["CAKE_AUTH_DATABASE_URL"]
    auth = create_async_engine_for(auth_url, pool_size=1) if via == "outbox" else None
    bootstrap = environment["promotions"]["CAKE_PROMOTIONS_KAFKA_BOOTSTRAP_SERVERS"]
    base = USER_ID_BASE + secrets.randbelow(10**6) * USER_ID_SPAN
    logins = [Login(base + index, uuid.uuid4()) for index in range(users)]
    try:
        try:
            campaign_id = await create_campaign(promotions, max_participants)
        except (sa.exc.OperationalError, OSError) as error:
            raise BenchError(
                f"the {profile} stack's promotions database does not answer"
                f" ({str(getattr(error, 'orig', None) or error).strip()[:200]}); is the stack"
                f" up? (make up, or uv run cake-stack up --profile {profile})"
            ) from None
        try:
            began = time.monotonic()
            if via == "outbox":
                writer = await logins_via_outbox(
                    auth_url, logins, rate, writers, notify_ms=notify_ms
                )
            else:
                writer = await logins_via_kafka(bootstrap, logins, rate)
            sent_in = time.monotonic() - began
            last_login = time.time()
            applied = await wait_until_decided(promotions, base, users, wait_seconds)
            drained_in = time.monotonic() - began
            measured = await measure(promotions, auth, campaign_id, logins)
        finally:
            await end_campaign(promotions, campaign_id)
    finally:
        await promotions.dispose()
        if auth is not None:
            await auth.dispose()

    expected = min(users, max_participants)
    orders = measured["orders"]
    present = set(orders)
    return BurstResult(
        via=via,
        users=users,
        max_participants=max_participants,
        asked_rate=rate,
        reached_rate=round(writer.reached_rate, 1),
        writer_kept_rate=writer.kept_rate,
        writer_max_behind_ms=round(writer.max_behind_ms, 1),
        sent_seconds=round(sent_in, 2),
        applied=applied,
        drained_seconds=round(drained_in, 2),
        applied_after_last_login_seconds=round(
            max(measured["last_decided_at"] - last_login, 0.0), 2
        ),
        consumer_rate=round(applied / measured["decided_span"], 1)
        if measured["decided_span"]
        else 0.0,
        vouchers=len(measured["voucher_ms"]),
        expected_vouchers=expected,
        participants=measured["participants"],
        order_gaps=sum(1 for order in range(1, len(present) + 1) if order not in present)
        + sum(1 for order in present if order > len(present)),
        order_repeats=len(orders) - len(present),
        told_full=measured["told_full"],
        voucher_ms=summary(measured["voucher_ms"]),
        decision_ms=summary(measured["decision_ms"]),
        relay_ms=summary(measured["relay_ms"]),
    )


def writer_warning(result: BurstResult) -> str | None:
    """A plain sentence when the writer could not keep the asked rate, else ``None``."""
    if result.writer_kept_rate:
        return None
    return (
        f"the writer could NOT keep {result.asked_rate:g} logins/s on this box: it reached"
        f" {result.reached_rate:g}/s (up to {result.writer_max_behind_ms:.0f} ms behind its"
        " schedule); the figures below are for the rate it reached, not the one asked"
    )


def print_result(result: BurstResult) -> None:
    warning = writer_warning(result)
    if warning:
        print(f"WARNING: {warning}")
    asked = f"{result.asked_rate:g}/s" if result.asked_rate else "full speed"
    print(
        f"first-login burst via {result.via}: {result.users} logins asked at {asked},"
        f" sent at {result.reached_rate:g}/s in {result.sent_seconds} s;"
        f" all decided after {result.drained_seconds} s"
        f" ({result.applied_after_last_login_seconds} s after the last login)"
    )
    print(
        f"events applied by promotions: {result.applied}/{result.users}"
        f" (consumer: {result.consumer_rate:g} decisions/s from first to last)"
    )
    verdict = "OK" if result.correct else "MISMATCH"
    print(
        f"vouchers issued: {result.vouchers} (expected min(N, max) = {result.expected_vouchers});"
        f" campaign participants {result.participants}; order gaps {result.order_gaps},"
        f" repeats {result.order_repeats}; told full {result.told_full} -> {verdict}"
    )
    for label, values in (
        ("login commit -> voucher commit", result.voucher_ms),
        ("login commit -> decision (all users)", result.decision_ms),
        ("  of which login commit -> relay published", result.relay_ms),
    ):
        if values:
            print(
                f"{label} (ms): p50 {values['p50']:.1f}  p95 {values['p95']:.1f}"
                f"  p99 {values['p99']:.1f}  max {values['max']:.1f}"
            )


def arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--users", type=int, default=300, help="first logins (N)")
    parser.add_argument(
        "--rate", type=float, default=100.0, help="logins per second (0: as fast as it goes)"
    )
    parser.add_argument("--max", type=int, default=100, help="campaign max participants")
    parser.add_argument("--via", choices=("outbox", "kafka"), default="outbox")
    parser.add_argument("--writers", type=int, default=8, help="writer connections (outbox)")
    parser.add_argument(
        "--notify",
        default="5",
        help="milliseconds between the relay's notifications, or per-login (as auth does)",
    )
    parser.add_argument("--profile", default="dev", help="stack profile (dev or test)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for all")
    parser.add_argument("--json", action="store_true", help="also print the result as JSON")
    return parser.parse_args(argv)


def run_or_explain(coroutine: Any) -> Any:
    """Run the benchmark; a failure it can name is one line on stderr and exit 2."""
    try:
        return asyncio.run(coroutine)
    except BenchError as error:
        print(f"first-login burst: {error}", file=sys.stderr)
        sys.exit(2)
    except (OSError, KafkaError, psycopg.Error, sa.exc.SQLAlchemyError) as error:
        print(
            f"first-login burst: failed: {error.__class__.__name__}: {str(error)[:300]}"
            " (is the stack up and healthy? make up / make status)",
            file=sys.stderr,
        )
        sys.exit(2)
    except KeyboardInterrupt:
        print("first-login burst: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as error:  # e.g. invalid stack settings: still one line
        print(
            f"first-login burst: failed: {error.__class__.__name__}: {str(error)[:300]}",
            file=sys.stderr,
        )
        sys.exit(2)


def main() -> None:
    args = arguments()
    if args.notify != "per-login":
        try:
            float(args.notify)
        except ValueError:
            raise SystemExit("--notify takes milliseconds or per-login") from None
    result: BurstResult = run_or_explain(
        burst(
            args.profile,
            users=args.users,
            rate=args.rate,
            max_participants=args.max,
            via=args.via,
            writers=args.writers,
            notify_ms=None if args.notify == "per-login" else float(args.notify),
            wait_seconds=args.timeout,
        )
    )
    print_result(result)
    if args.json:
        print(json.dumps(result.as_dict()))
    if not result.correct:
        sys.exit(1)
    if not result.writer_kept_rate:
        sys.exit(3)


if __name__ == "__main__":
    main()
