"""Where the time goes per first-login enrollment: database, Kafka, Python.

The promotions first-login consumer (``bootstrap.first_login_consumer``: the generic Kafka
consumer with the first-login handler, the code ``cake-promotions consume`` runs) is started
in THIS process on a fresh topic holding ``--events`` USER_FIRST_LOGIN events (published
before it starts, so it drains a backlog as fast as it can), against the stack's promotions
database and a fresh campaign with room for everyone (every event takes the full enrollment
path: slot, participation, voucher, two outbox rows).

While it drains, every database call (cursor executes and commits) and every Kafka call of
the consumer (``getmany``, ``commit``) is timed in-process:

- **wall**: first batch received -> last event counted, divided by the events;
- **database** / **kafka**: wall-clock time during which at least one such call was in flight
  (the union of the intervals, so concurrent transactions are not counted twice);
- **python**: the rest (decoding, validation, spans, metrics, logs, SQLAlchemy, asyncio);
- **db summed**: the durations of all database calls added up: above ``database`` when
  transactions run concurrently, i.e. queue on the campaign row lock.

Run with the stack up (``make up``)::

    uv run python bench/enrollment_profile.py                 # 3,000 events, 6 partitions
    uv run python bench/enrollment_profile.py --events 1000 --profile test

It prints one table and exits non-zero if an event was not applied.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from cake.events.v1 import envelope_pb2, payloads_pb2, registry
from cake_common.db import create_async_engine_for
from cake_common.kafka import create_producer, ensure_topics, kafka_headers, start_with_retry
from cake_common.logging import configure_logging
from cake_devtools.stack import service_environment
from cake_promotions import bootstrap
from cake_promotions.metrics import PromotionsMetrics
from cake_promotions.service.enrollment import FirstLoginEnrollment
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

USER_ID_BASE = 8_000_000_000_000


class Busy:
    """Wall-clock time during which at least one call of a kind was in flight, and the sum
    of all their durations."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.since = 0.0
        self.union = 0.0
        self.summed = 0.0
        self.calls = 0

    def enter(self) -> float:
        now = time.perf_counter()
        if self.in_flight == 0:
            self.since = now
        self.in_flight += 1
        self.calls += 1
        return now

    def leave(self, started: float) -> None:
        now = time.perf_counter()
        self.in_flight -= 1
        self.summed += now - started
        if self.in_flight == 0:
            self.union += now - self.since

    def reset(self) -> None:
        self.union = self.summed = 0.0
        self.calls = 0
        if self.in_flight:
            self.since = time.perf_counter()


class Clock:
    """Both kinds of I/O together: what is left of the wall time is this process's Python."""

    def __init__(self) -> None:
        self.database = Busy()
        self.kafka = Busy()
        self.any_io = Busy()

    @contextlib.contextmanager
    def timing(self, kind: Busy) -> Iterator[None]:
        started = kind.enter()
        io_started = self.any_io.enter()
        try:
            yield
        finally:
            kind.leave(started)
            self.any_io.leave(io_started)

    def reset(self) -> None:
        for busy in (self.database, self.kafka, self.any_io):
            busy.reset()


def instrument(engine: AsyncEngine, clock: Clock) -> Callable[[], None]:
    """Time every cursor execute of ``engine``, every session commit and the consumer's Kafka
    calls; returns a function that undoes the patches."""
    starts: dict[int, tuple[float, float]] = {}

    def before(conn: Any, cursor: Any, *_: Any) -> None:
        starts[id(cursor)] = (clock.database.enter(), clock.any_io.enter())

    def after(conn: Any, cursor: Any, *_: Any) -> None:
        started = starts.pop(id(cursor), None)
        if started is not None:
            clock.database.leave(started[0])
            clock.any_io.leave(started[1])

    def failed(context: Any) -> None:
        after(None, context.cursor)

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    event.listen(engine.sync_engine, "after_cursor_execute", after)
    event.listen(engine.sync_engine, "handle_error", failed)

    originals: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str, kind: Busy) -> None:
        original = getattr(owner, name)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            with clock.timing(kind):
                return await original(*args, **kwargs)

        originals.append((owner, name, original))
        setattr(owner, name, timed)

    wrap(AsyncSession, "commit", clock.database)
    wrap(AIOKafkaConsumer, "getmany", clock.kafka)
    wrap(AIOKafkaConsumer, "commit", clock.kafka)

    def undo() -> None:
        event.remove(engine.sync_engine, "before_cursor_execute", before)
        event.remove(engine.sync_engine, "after_cursor_execute", after)
        event.remove(engine.sync_engine, "handle_error", failed)
        for owner, name, original in originals:
            setattr(owner, name, original)

    return undo


def envelope(user_id: int, login_at: datetime, event_id: uuid.UUID) -> bytes:
    stamp = Timestamp()
    stamp.FromDatetime(login_at)
    payload = AnyMessage()
    payload.Pack(payloads_pb2.UserFirstLogin(user_id=user_id, login_at=stamp))
    return envelope_pb2.EventEnvelope(
        event_id=str(event_id),
        type=registry.USER_FIRST_LOGIN.name,
        occurred_at=stamp,
        aggregate_type=registry.USER_FIRST_LOGIN.aggregate_type,
        aggregate_id=str(user_id),
        payload=payload,
    ).SerializeToString()


@dataclass
class Profile:
    code: str
    events: int
    applied: int
    partitions: int
    seconds: float
    per_second: float
    wall_us: float
    database_us: float
    kafka_us: float
    python_us: float
    database_summed_us: float
    database_calls_per_event: float
    cpu_us: float


async def publish(bootstrap_servers: str, topic: str, users: list[int], now: datetime) -> None:
    producer = await start_with_retry(
        lambda: create_producer(bootstrap_servers, "enrollment-profile", linger_ms=20),
        timeout_seconds=30,
    )
    try:
        sends = []
        for user in users:
            event_id = uuid.uuid4()
            sends.append(
                await producer.send(
                    topic,
                    key=str(user).encode(),
                    value=envelope(user, now, event_id),
                    headers=kafka_headers(event_id, registry.USER_FIRST_LOGIN.name),
                )
            )
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


async def profile(arguments: argparse.Namespace) -> Profile:
    environment = service_environment(arguments.profile)["promotions"]
    bootstrap_servers = environment["CAKE_PROMOTIONS_KAFKA_BOOTSTRAP_SERVERS"]
    engine = create_async_engine_for(
        environment["CAKE_PROMOTIONS_DATABASE_URL"], pool_size=arguments.partitions + 2
    )
    topic = f"bench.enrollment-profile.{uuid.uuid4().hex[:10]}"
    await ensure_topics(
        bootstrap_servers, {topic: arguments.partitions, registry.dead_letter_topic_for(topic): 1}
    )
    now = datetime.now(UTC)
    async with engine.begin() as connection:
        campaign_id = await connection.scalar(
            sa.text(
                "INSERT INTO promotion_campaigns (name, description, start_date, end_date,"
                " max_participants) VALUES ('enrollment profile', 'bench/enrollment_profile.py',"
                " :start, :end, :max) RETURNING id"
            ),
            {"start": now - timedelta(minutes=5), "end": now + timedelta(hours=1), "max": 10**6},
        )
    base = USER_ID_BASE + secrets.randbelow(10**6) * 10**6
    users = [base + index for index in range(arguments.events)]
    await publish(bootstrap_servers, topic, users, now)

    metrics_registry = CollectorRegistry()
    metrics = PromotionsMetrics(metrics_registry)
    consumer = bootstrap.first_login_consumer(
        FirstLoginEnrollment(bootstrap.unit_of_work_factory(engine), metrics),
        metrics,
        bootstrap_servers=bootstrap_servers,
        topic=topic,
        group_id=f"enrollment-profile-{uuid.uuid4().hex[:8]}",
        client_id="enrollment-profile",
        max_batch=arguments.max_batch,
    )

    def consumed() -> float:
        return sum(
            sample.value
            for family in metrics_registry.collect()
            if family.name == "cake_promotions_consumed_events"
            for sample in family.samples
            if sample.name.endswith("_total")
        )

    clock = Clock()
    undo = instrument(engine, clock)
    consumer.start()
    try:
        deadline = time.monotonic() + arguments.timeout
        while consumed() == 0 and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a counter
            await asyncio.sleep(0.001)
        # The clock starts with the first event applied: joining the group is not enrollment.
        clock.reset()
        started, cpu_started, first = time.perf_counter(), time.process_time(), consumed()
        while consumed() < arguments.events and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.002)
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        applied = int(consumed())
        measured = max(applied - int(first), 1)
    finally:
        await consumer.stop()
        undo()
        async with engine.begin() as connection:
            await connection.execute(
                sa.text("UPDATE promotion_campaigns SET status = 'expired' WHERE id = :id"),
                {"id": campaign_id},
            )
        await engine.dispose()

    def per_event(value: float) -> float:
        return round(value / measured * 1e6, 1)

    io = clock.any_io.union
    return Profile(
        code="batch" if hasattr(FirstLoginEnrollment, "enroll_batch") else "per-event",
        events=arguments.events,
        applied=applied,
        partitions=arguments.partitions,
        seconds=round(seconds, 3),
        per_second=round(measured / seconds, 1) if seconds else 0.0,
        wall_us=per_event(seconds),
        database_us=per_event(clock.database.union),
        kafka_us=per_event(clock.kafka.union),
        python_us=per_event(max(seconds - io, 0.0)),
        database_summed_us=per_event(clock.database.summed),
        database_calls_per_event=round(clock.database.calls / measured, 2),
        cpu_us=per_event(cpu),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--profile", default="dev", help="stack profile (dev or test)")
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--max-batch", type=int, default=500, help="consumer max_poll_records")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON too")
    arguments = parser.parse_args()
    # As the service logs (JSON lines at INFO: one per enrollment), into /dev/null.
    configure_logging("INFO", json=True, service_name="cake-promotions")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(open(os.devnull, "w"))  # noqa: SIM115 - for the whole run
    try:
        result = asyncio.run(profile(arguments))
    except (OSError, KafkaError, sa.exc.OperationalError) as error:
        raise SystemExit(
            f"enrollment profile: the stack is not reachable: {error!r:.200}"
        ) from None
    print(
        f"enrollment profile ({result.code} code): {result.applied}/{result.events} events,"
        f" {result.partitions} partitions, {result.seconds:.2f} s -> {result.per_second:.0f}"
        " enrollments/s"
    )
    print("per enrollment (µs):  wall  database  kafka  python | db summed  db calls  cpu")
    print(
        f"                   {result.wall_us:6.0f}  {result.database_us:8.0f}"
        f"  {result.kafka_us:5.0f}  {result.python_us:6.0f} | {result.database_summed_us:9.0f}"
        f"  {result.database_calls_per_event:8.2f}  {result.cpu_us:4.0f}"
    )
    if arguments.json:
        print(json.dumps(asdict(result)))
    if result.applied < result.events:
        sys.exit(1)


if __name__ == "__main__":
    main()
