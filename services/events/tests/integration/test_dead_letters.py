"""Poison rows: retried with backoff, parked as dead letters, put back once fixed."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from cake.events.v1 import envelope_pb2, payloads_pb2
from cake_common.auth_context import principal_var
from cake_common.db import create_async_engine_for, create_session_factory
from cake_common.jwt import Principal
from cake_events.adapters.outbox_source import OutboxAdministration
from cake_events.adapters.tables import dead_letters, published_events
from cake_events.adapters.unit_of_work import SqlEventsUnitOfWork
from cake_events.service.admin import EventAdministration, SourceOutbox
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

MAX_ATTEMPTS = 3


async def source_rows(libpq_url: str) -> dict[uuid.UUID, dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(libpq_url) as conn:
        cursor = conn.cursor(row_factory=psycopg.rows.dict_row)
        await cursor.execute("SELECT * FROM outbox")
        return {row["event_id"]: row for row in await cursor.fetchall()}


async def fix_payload(libpq_url: str, event_id: uuid.UUID, payload: bytes) -> None:
    async with await psycopg.AsyncConnection.connect(libpq_url) as conn:
        await conn.execute(
            "UPDATE outbox SET payload = %s WHERE event_id = %s", (payload, event_id)
        )


async def parked(engine: AsyncEngine) -> dict[uuid.UUID, Any]:
    async with engine.connect() as connection:
        rows = (await connection.execute(sa.select(dead_letters))).mappings().all()
    return {row["event_id"]: row for row in rows}


async def test_poison_rows_are_dead_lettered_and_republished_once_fixed(
    kit: Any,
    make_source_db: Any,
    relay_settings: Any,
    running_relays: Any,
    topic_routes: dict[str, str],
    kafka_bootstrap: str,
    events_engine: AsyncEngine,
) -> None:
    auth = make_source_db()
    first = kit.event_row("USER_FIRST_LOGIN", user_id=100)
    valid_payload = kit.payload_for("USER_FIRST_LOGIN", 100, 1).SerializeToString()
    # Field 1 declared as a 255-byte string with 1 byte present: no protobuf parser takes it.
    unreadable = kit.OutboxRow(
        event_id=uuid.uuid4(),
        event_type="USER_FIRST_LOGIN",
        aggregate_id="100",
        payload=b"\x0a\xff",
        payload_type="cake.events.v1.UserFirstLogin",
    )
    after_unreadable = kit.event_row("USER_FIRST_LOGIN", user_id=100, sequence=2)
    other_user = kit.event_row("USER_FIRST_LOGIN", user_id=200)
    # A valid payload over Kafka's 1 MiB request limit: rejected by the producer itself.
    too_large = kit.OutboxRow(
        event_id=uuid.uuid4(),
        event_type="USER_FIRST_LOGIN",
        aggregate_id="300",
        payload=payloads_pb2.UserFirstLogin(
            user_id=300, user_agent="x" * 1_200_000
        ).SerializeToString(),
        payload_type="cake.events.v1.UserFirstLogin",
    )
    unrouted = kit.OutboxRow(
        event_id=uuid.uuid4(),
        event_type="USER_LOGGED_OUT",
        aggregate_id="400",
        payload=b"",
        payload_type="cake.events.v1.UserFirstLogin",
    )
    rows = [first, unreadable, after_unreadable, other_user, too_large, unrouted]
    poison = {unreadable.event_id, too_large.event_id, unrouted.event_id}
    topic = topic_routes["USER_FIRST_LOGIN"]
    settings = relay_settings(auth=auth, relay_max_attempts=MAX_ATTEMPTS)
    session_factory = create_session_factory(events_engine)
    auth_outbox_engine = create_async_engine_for(auth.relay_url, pool_size=1)
    administration = EventAdministration(
        events_uow=lambda: SqlEventsUnitOfWork(session_factory),
        outboxes=[SourceOutbox("auth", (), OutboxAdministration(auth_outbox_engine))],
        in_flight=lambda source: 0,
    )

    async with running_relays(settings) as (_, registry):
        await kit.write_rows(auth, rows)

        async def all_settled() -> bool:
            state = await kit.outbox_state(auth)
            return state["published"] == 3 and state["dead"] == 3

        await kit.wait_until(all_settled, what="3 rows published and 3 dead-lettered")

        outbox = await source_rows(auth.owner_libpq_url)
        for event_id in poison:
            assert outbox[event_id]["attempts"] == MAX_ATTEMPTS
            assert outbox[event_id]["dead_lettered_at"] is not None
        # Held back behind the failing row of its user, never attempted itself.
        assert outbox[after_unreadable.event_id]["attempts"] == 0
        assert (
            outbox[after_unreadable.event_id]["published_at"]
            >= outbox[unreadable.event_id]["dead_lettered_at"]
        )

        letters = await parked(events_engine)
        assert set(letters) == poison
        assert (
            "not a valid cake.events.v1.UserFirstLogin"
            in letters[unreadable.event_id]["last_error"]
        )
        assert "MessageSizeTooLarge" in letters[too_large.event_id]["last_error"]
        assert "no topic route" in letters[unrouted.event_id]["last_error"]
        assert letters[unrouted.event_id]["topic"] is None
        assert letters[unreadable.event_id]["payload"] == b"\x0a\xff"
        assert all(letter["attempts"] == MAX_ATTEMPTS for letter in letters.values())

        def metric(name: str, labels: dict[str, str]) -> float:
            return registry.get_sample_value(name, labels) or 0.0

        assert (
            metric("cake_events_relay_dead_lettered_total", {"source": "auth", "topic": topic}) == 2
        )
        assert metric("cake_events_relay_dead_lettered_total", {"source": "auth", "topic": ""}) == 1
        assert (
            metric("cake_events_relay_failed_attempts_total", {"source": "auth", "topic": topic})
            == 2 * MAX_ATTEMPTS
        )
        # The too-large one cannot be copied to the .dlq topic either; the unrouted one has none.
        assert (
            metric("cake_events_relay_dead_letter_publish_failures_total", {"source": "auth"}) == 2
        )

        dlq = await kit.read_topics(kafka_bootstrap, [topic + ".dlq"])
        assert dlq.event_ids() == [unreadable.event_id]
        # The one dead-letter header set (the promotions consumer writes the same names).
        parked_headers = dict(dlq.records[0].headers)
        assert b"not a valid" in parked_headers["cake_dead_letter_reason"]
        assert parked_headers["cake_dead_letter_origin"].startswith(b"outbox/auth/")

        delivered = await kit.read_topics(kafka_bootstrap, [topic])
        assert delivered.by_aggregate() == {
            "100": [first.event_id, after_unreadable.event_id],
            "200": [other_user.event_id],
        }

        # Fix two of the rows, then put every dead letter back.
        await fix_payload(auth.owner_libpq_url, unreadable.event_id, valid_payload)
        await fix_payload(
            auth.owner_libpq_url,
            too_large.event_id,
            kit.payload_for("USER_FIRST_LOGIN", 300, 0).SerializeToString(),
        )
        token = principal_var.set(
            Principal(
                user_id=1,
                role="admin",
                jti="test",
                expires_at=datetime.now(UTC) + timedelta(hours=1),
            )
        )
        try:
            assert await administration.retry_failed() == 3
        finally:
            principal_var.reset(token)

        async def retried() -> bool:
            state = await kit.outbox_state(auth)
            return state["published"] == 5 and state["dead"] == 1 and state["waiting"] == 0

        await kit.wait_until(retried, what="fixed rows published, the unfixable one parked again")

    delivered = await kit.read_topics(kafka_bootstrap, [topic])
    # Published once each; the retried event comes after the newer event of its user.
    assert delivered.by_aggregate() == {
        "100": [first.event_id, after_unreadable.event_id, unreadable.event_id],
        "200": [other_user.event_id],
        "300": [too_large.event_id],
    }
    republished = {
        envelope.event_id: envelope
        for envelope in (envelope_pb2.EventEnvelope.FromString(r.value) for r in delivered.records)
    }
    assert republished[str(unreadable.event_id)].payload.value == valid_payload
    letters = await parked(events_engine)
    assert letters[unreadable.event_id]["retried_at"] is not None
    assert letters[too_large.event_id]["retried_at"] is not None
    # Dead-lettered again: parked anew, with a fresh count.
    assert letters[unrouted.event_id]["retried_at"] is None
    assert letters[unrouted.event_id]["attempts"] == MAX_ATTEMPTS
    async with events_engine.connect() as connection:
        audited = (
            await connection.execute(
                sa.select(sa.func.count()).where(
                    published_events.c.event_id.in_([r.event_id for r in rows])
                )
            )
        ).scalar_one()
    assert audited == 5
    await auth_outbox_engine.dispose()
