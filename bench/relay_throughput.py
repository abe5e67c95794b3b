"""Outbox relay benchmark: throughput against a raw producer, and commit-to-Kafka lag.

Runs against real PostgreSQL and Kafka of a local stack profile (started if needed) in
scratch databases and throw-away topics, and prints numbers (it asserts nothing)::

    uv run python bench/relay_throughput.py                      # 100k rows, 200 events/s
    uv run python bench/relay_throughput.py --rows 20000 --lag-seconds 10

1. Raw ceiling: one aiokafka producer (same settings as the relay's) sends the exact
   messages the relay would send (same envelopes, keys, headers) as fast as it can.
2. Relay: the same rows committed to an outbox in one transaction; the relay (in this
   process, default settings, tracing off) claims, publishes, writes the audit log and
   marks them published. Throughput = rows / time from the commit until the relay's
   ``published`` counter says every row is marked (read in-process, so the measurement
   puts no load on the database; the outbox is checked once at the end).
   Ratio = relay / raw (goal >= 0.5). For information only, the same messages are also
   sent by the raw producer as whole per-partition batches (``create_batch``/``send_batch``,
   partition of each key as aiokafka's default partitioner picks it), the way the relay
   hands them over: the ceiling of that API, not the ratio's baseline. Each round also
   prints this process's CPU time per event during the raw, relay and batched runs
   (``time.process_time``; the relay's includes its claims and recordings, not PostgreSQL's
   side of them).
3. Lag: single-row outbox transactions (``OutboxWriter``, NOTIFY included) at a steady rate;
   lag = broker append time (topics use ``LogAppendTime``) - client-side commit time.
   Goal: P99 < 100 ms at 200 events/s.

Both throughput runs happen in this one process, one after the other, so each ratio is
measured under the same machine load (printed too: the box is shared); ``--rounds``
(default 3) repeats the pair with fresh rows, prints every round and takes the median
ratio, since the raw producer alone varies by +-15 % between runs on a shared box. An
untimed warm-up round of both comes first (a freshly started broker is much slower).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import secrets
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner
from cake.events.v1 import envelope_pb2, payloads_pb2
from cake.events.v1 import registry as event_registry
from cake_common.db import create_async_engine_for
from cake_common.kafka import create_producer
from cake_common.migrations import run_alembic_upgrade
from cake_common.outbox import OutboxWriter, grant_outbox_to_relay_sql, outbox_table
from cake_devtools.stack import Stack
from cake_events.bootstrap import MIGRATIONS, build_relays
from cake_events.domain.envelope import EnvelopeBuilder, KafkaMessage
from cake_events.domain.relay import OutboxEvent
from cake_events.settings import EventsSettings
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry
from psycopg import sql
from sqlalchemy.engine import make_url

PARTITIONS = 6
USERS = 1000
WARM_UP_ROWS = 30_000


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="test", help="local stack profile (default: test)")
    parser.add_argument("--rows", type=int, default=100_000, help="rows for the throughput run")
    parser.add_argument("--batch-size", type=int, default=None, help="relay batch size")
    parser.add_argument(
        "--rounds",
        type=_positive_int,
        default=3,
        help="raw-then-relay rounds (the median is the result)",
    )
    parser.add_argument("--rate", type=float, default=200.0, help="events/s for the lag run")
    parser.add_argument("--lag-seconds", type=float, default=15.0, help="length of the lag run")
    return parser.parse_args()


@contextmanager
def scratch_database(admin_url: str, label: str) -> Iterator[str]:
    """An empty database for the run; yields its async SQLAlchemy URL (superuser)."""
    name = f"bench_{re.sub(r'[^a-z0-9]+', '_', label)}_{secrets.token_hex(3)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield (
            make_url(admin_url)
            .set(drivername="postgresql+psycopg", database=name)
            .render_as_string(hide_password=False)
        )
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def create_outbox(owner_url: str) -> None:
    engine = sa.create_engine(owner_url, poolclass=sa.pool.NullPool)
    try:
        metadata = sa.MetaData()
        outbox_table(metadata)
        with engine.begin() as connection:
            metadata.create_all(connection)
            connection.execute(sa.text(grant_outbox_to_relay_sql("cake_relay")))
    finally:
        engine.dispose()


def outbox_events(count: int) -> list[OutboxEvent]:
    now = datetime.now(UTC)
    login_at = Timestamp()
    login_at.FromDatetime(now)
    events = []
    for index in range(count):
        user_id = 1 + index % USERS
        payload = payloads_pb2.UserFirstLogin(
            user_id=user_id, login_at=login_at, user_agent="vegeta/12.13", client_ip="10.0.0.1"
        )
        events.append(
            OutboxEvent(
                id=index + 1,
                event_id=str(uuid.uuid4()),
                event_type=event_registry.USER_FIRST_LOGIN.name,
                aggregate_type=event_registry.USER_FIRST_LOGIN.aggregate_type,
                aggregate_id=str(user_id),
                payload=payload.SerializeToString(),
                payload_type=payload.DESCRIPTOR.full_name,
                occurred_at=now,
                trace_parent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                attempts=0,
            )
        )
    return events


async def create_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="cake-bench")
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(
                    name,
                    num_partitions=PARTITIONS,
                    replication_factor=1,
                    topic_configs={"message.timestamp.type": "LogAppendTime"},
                )
                for name in names
            ]
        )
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="cake-bench")
    await admin.start()
    try:
        await admin.delete_topics(names)
    finally:
        await admin.close()


@asynccontextmanager
async def raw_producer(settings: EventsSettings, client_id: str) -> AsyncIterator[AIOKafkaProducer]:
    """A started producer configured as the relay's (batch size, linger, timeout)."""
    producer = create_producer(
        settings.kafka_bootstrap_servers,
        client_id,
        request_timeout_ms=int(settings.relay_kafka_timeout_seconds * 1000),
        max_batch_size=settings.relay_kafka_max_batch_bytes,
        linger_ms=settings.relay_kafka_linger_ms,
    )
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def timed_sends(
    count: int, hand_over: Callable[[], Awaitable[list[asyncio.Future[Any]]]]
) -> tuple[float, float]:
    """Run ``hand_over`` and wait for every future it returns: events/s for ``count``
    events, and this process's CPU µs per event meanwhile."""
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*await hand_over())
    return (
        count / (time.perf_counter() - started),
        (time.process_time() - cpu) / count * 1e6,
    )


async def raw_producer_rate(
    settings: EventsSettings, messages: list[KafkaMessage]
) -> tuple[float, float]:
    """Events/s, and this process's CPU µs per event meanwhile."""
    async with raw_producer(settings, "cake-bench-raw") as producer:

        async def hand_over() -> list[asyncio.Future[Any]]:
            return [
                await producer.send(m.topic, m.value, key=m.key, headers=m.headers)
                for m in messages
            ]

        return await timed_sends(len(messages), hand_over)


async def raw_batched_rate(
    settings: EventsSettings, messages: list[KafkaMessage]
) -> tuple[float, float]:
    """The raw producer again, handing over whole per-partition batches (info only)."""
    async with raw_producer(settings, "cake-bench-raw-batched") as producer:
        partitioner = DefaultPartitioner()

        async def hand_over() -> list[asyncio.Future[Any]]:
            partitions = sorted(await producer.partitions_for(messages[0].topic))
            batches: dict[int, Any] = {}
            futures = []
            for m in messages:
                partition = partitioner(m.key, partitions, partitions)
                batch = batches.get(partition)
                if batch is None:
                    batch = batches[partition] = producer.create_batch()
                appended = batch.append(key=m.key, value=m.value, timestamp=None, headers=m.headers)
                if appended is None:
                    futures.append(await producer.send_batch(batch, m.topic, partition=partition))
                    batch = batches[partition] = producer.create_batch()
                    batch.append(key=m.key, value=m.value, timestamp=None, headers=m.headers)
            for partition, batch in batches.items():
                futures.append(
                    await producer.send_batch(batch, messages[0].topic, partition=partition)
                )
            return futures

        return await timed_sends(len(messages), hand_over)


async def warm_up(
    settings: EventsSettings,
    builder: EnvelopeBuilder,
    raw_topic: str,
    relay: tuple[str, CollectorRegistry, str],
    rows: int,
) -> None:
    """An untimed round of both: a broker that has just started (JIT, page cache, new log
    segments) and a relay that has not published yet took their first round at a third to
    two thirds of their later speed (measured). ``relay``: outbox URL, registry, topic."""
    await raw_producer_rate(
        settings, [builder.message_for(e, raw_topic) for e in outbox_events(rows)]
    )
    await relay_rate(relay[0], outbox_events(rows), relay[1], relay[2])


async def copy_rows(libpq_url: str, events: list[OutboxEvent]) -> None:
    async with await psycopg.AsyncConnection.connect(libpq_url) as conn:
        async with conn.cursor() as cursor:
            async with cursor.copy(
                "COPY outbox (event_id, event_type, aggregate_type, aggregate_id, payload,"
                " payload_type, occurred_at, trace_parent) FROM STDIN"
            ) as copy:
                for e in events:
                    await copy.write_row(
                        (
                            e.event_id,
                            e.event_type,
                            e.aggregate_type,
                            e.aggregate_id,
                            e.payload,
                            e.payload_type,
                            e.occurred_at,
                            e.trace_parent,
                        )
                    )
            await cursor.execute("SELECT pg_notify('cake_outbox', current_database())")
        await conn.commit()


async def relay_rate(
    libpq_url: str, events: list[OutboxEvent], registry: CollectorRegistry, topic: str
) -> float:
    """Events/s from the commit of ``events`` until the relay has marked them all.

    Progress is read from the relay's own ``published`` counter (incremented once a batch's
    marks committed), in this process: polling the outbox would load the database under
    test. The outbox is checked once at the end.
    """
    labels = {"source": "auth", "topic": topic}

    def published() -> float:
        return registry.get_sample_value("cake_events_relay_published_total", labels) or 0.0

    before = published()
    # The rows become visible to the relay at this commit (one transaction).
    await copy_rows(libpq_url, events)
    started, cpu = time.perf_counter(), time.process_time()
    while published() - before < len(events):  # noqa: ASYNC110 (a counter, no event to wait on)
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started
    cpu_per_event = (time.process_time() - cpu) / len(events) * 1e6
    async with await psycopg.AsyncConnection.connect(libpq_url, autocommit=True) as conn:
        cursor = await conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        row = await cursor.fetchone()
    if row is None or row[0] != 0:
        raise SystemExit(f"the relay counted every event but {row} rows are still unpublished")
    return len(events) / elapsed, cpu_per_event


async def commit_to_kafka_lag(
    owner_url: str, bootstrap: str, topic: str, rate: float, seconds: float
) -> list[float]:
    """Milliseconds from each outbox commit to the broker's append of its message."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=5
    )
    await consumer.start()
    partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(partitions)
    await consumer.seek_to_end(*partitions)
    for partition in partitions:
        await consumer.position(partition)
    committed_ms: dict[str, float] = {}
    lags: list[float] = []
    count = int(rate * seconds)

    async def read() -> None:
        while len(lags) < count:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    event_id = envelope_pb2.EventEnvelope.FromString(record.value).event_id
                    if event_id in committed_ms:
                        lags.append(record.timestamp - committed_ms[event_id])

    reader = asyncio.create_task(read())
    engine = create_async_engine_for(owner_url, pool_size=1)
    writer = OutboxWriter()
    login_at = Timestamp()
    login_at.FromDatetime(datetime.now(UTC))
    try:
        started = time.perf_counter()
        for index in range(count):
            delay = started + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            user_id = 1 + index % USERS
            async with engine.connect() as connection:
                event_id = await writer.add(
                    connection,
                    event_registry.USER_FIRST_LOGIN,
                    aggregate_id=user_id,
                    payload=payloads_pb2.UserFirstLogin(user_id=user_id, login_at=login_at),
                    occurred_at=datetime.now(UTC),
                )
                await connection.commit()
                committed_ms[str(event_id)] = time.time() * 1000
        await asyncio.wait_for(reader, 60)
    finally:
        reader.cancel()
        await engine.dispose()
        await consumer.stop()
    return lags


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass(frozen=True)
class RelayMeasurement:
    """Every round's (raw producer, relay) events/s, and the lag run's lags (ms)."""

    batch_size: int
    rounds: list[tuple[float, float]]
    lags: list[float]
    raw_batched: list[float] = field(default_factory=list)
    """Each round's raw producer sending per-partition batches (info, not the baseline)."""
    cpu: list[tuple[float, float, float]] = field(default_factory=list)
    """Each round's CPU µs per event of this process: raw, relay, raw with batches (info)."""

    @property
    def ratio(self) -> float:
        """The median of the rounds' relay ÷ raw (the result)."""
        return statistics.median(relay / raw for raw, relay in self.rounds)


async def measure(
    profile: str,
    *,
    rows: int,
    rounds: int,
    rate: float,
    lag_seconds: float,
    batch_size: int | None = None,
) -> RelayMeasurement:
    """The throughput rounds and the lag run (the module docstring) on ``profile``'s stack;
    ``bench/side_by_side.py`` calls it for its relay guard."""
    stack = Stack(profile=profile, echo=None)
    stack.up(("postgres", "kafka"))
    bootstrap = stack.kafka_bootstrap
    relay_template = next(
        source["outbox_url"]
        for source in json.loads(stack.service_environment()["events"]["CAKE_EVENTS_SOURCES"])
        if source["name"] == "auth"
    )
    prefix = f"bench.{uuid.uuid4().hex[:8]}"
    user_topic, raw_topic = f"{prefix}.user", f"{prefix}.raw"
    topics = [user_topic, event_registry.dead_letter_topic_for(user_topic), raw_topic]
    await create_topics(bootstrap, topics)
    try:
        with (
            scratch_database(stack.postgres_admin_url, "events") as events_url,
            scratch_database(stack.postgres_admin_url, "outbox") as owner_url,
        ):
            await asyncio.to_thread(run_alembic_upgrade, events_url, MIGRATIONS)
            create_outbox(owner_url)
            owner_libpq = (
                make_url(owner_url)
                .set(drivername="postgresql")
                .render_as_string(hide_password=False)
            )
            overrides = {"relay_batch_size": batch_size} if batch_size else {}
            settings = EventsSettings(
                database_url=events_url,
                sources=[
                    {
                        "name": "auth",
                        "outbox_url": make_url(relay_template)
                        .set(database=make_url(owner_url).database)
                        .render_as_string(hide_password=False),
                    }
                ],
                kafka_bootstrap_servers=bootstrap,
                topic_routes={event_registry.USER_FIRST_LOGIN.name: user_topic},
                log_level="WARNING",
                **overrides,
            )
            builder = EnvelopeBuilder()
            events_engine = create_async_engine_for(events_url, pool_size=2)
            registry = CollectorRegistry()
            wiring = build_relays(settings, events_engine, registry)
            wiring.group.start()
            measured: list[tuple[float, float]] = []
            raw_batched: list[float] = []
            cpu: list[tuple[float, float, float]] = []
            try:
                while not all(relay.is_active for relay in wiring.group.relays):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
                await warm_up(
                    settings,
                    builder,
                    raw_topic,
                    (owner_libpq, registry, user_topic),
                    min(rows, WARM_UP_ROWS),
                )
                for _ in range(rounds):
                    # Fresh rows (event ids are unique in the outbox) and their messages.
                    events = outbox_events(rows)
                    messages = [builder.message_for(e, raw_topic) for e in events]
                    # The harness's own 2 x rows objects would otherwise be scanned by every
                    # garbage collection during both measurements.
                    gc.freeze()
                    raw, raw_cpu = await raw_producer_rate(settings, messages)
                    relay, relay_cpu = await relay_rate(owner_libpq, events, registry, user_topic)
                    measured.append((raw, relay))
                    batched, batched_cpu = await raw_batched_rate(settings, messages)
                    raw_batched.append(batched)
                    cpu.append((raw_cpu, relay_cpu, batched_cpu))
                    del events, messages
                    gc.unfreeze()
                lags = await commit_to_kafka_lag(
                    owner_url, bootstrap, user_topic, rate, lag_seconds
                )
            finally:
                await wiring.group.stop()
                for engine in wiring.engines:
                    await engine.dispose()
                await events_engine.dispose()
    finally:
        await delete_topics(bootstrap, topics)
    return RelayMeasurement(settings.relay_batch_size, measured, lags, raw_batched, cpu)


async def main() -> None:
    args = parse_args()
    result = await measure(
        args.profile,
        rows=args.rows,
        rounds=args.rounds,
        rate=args.rate,
        lag_seconds=args.lag_seconds,
        batch_size=args.batch_size,
    )
    report(args, result)


def report(args: argparse.Namespace, result: RelayMeasurement) -> None:
    batch_size, rounds, lags = result.batch_size, result.rounds, result.lags
    raw_batched, cpu = result.raw_batched, result.cpu
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(
        f"rows: {args.rows} per round, {args.rounds} rounds, "
        f"relay batch size: {batch_size}, load avg: {load}"
    )
    for number, (raw, relay) in enumerate(rounds, 1):
        print(
            f"round {number}: raw aiokafka producer {raw:8,.0f} events/s, "
            f"outbox relay {relay:8,.0f} events/s, relay / raw {relay / raw:.2f}"
        )
    print(f"raw aiokafka producer : {statistics.median(r for r, _ in rounds):10,.0f} events/s")
    print(f"outbox relay          : {statistics.median(r for _, r in rounds):10,.0f} events/s")
    ratio = statistics.median(relay / raw for raw, relay in rounds)
    print(f"relay / raw           : {ratio:10.2f}   (median of the rounds' ratios; goal >= 0.5)")
    if raw_batched:
        print(
            f"info: raw producer with per-partition batches (send_batch): "
            f"{statistics.median(raw_batched):,.0f} events/s (median; rounds: "
            + ", ".join(f"{rate:,.0f}" for rate in raw_batched)
            + ")"
        )
    for number, (raw_cpu, relay_cpu, batched_cpu) in enumerate(cpu, 1):
        print(
            f"info: round {number} CPU of this process per event: raw {raw_cpu:.1f} µs, "
            f"relay {relay_cpu:.1f} µs (PostgreSQL's not included), "
            f"raw with batches {batched_cpu:.1f} µs"
        )
    print(
        f"commit-to-Kafka lag at {args.rate:g} events/s over {len(lags)} events: "
        f"P50 {statistics.median(lags):.1f} ms, P99 {percentile(lags, 0.99):.1f} ms, "
        f"max {max(lags):.1f} ms   (goal P99 < 100 ms)"
    )


if __name__ == "__main__":
    asyncio.run(main())
