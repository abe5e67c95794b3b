"""The admin RPCs through a real gRPC channel to the service as ``bootstrap`` wires it."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import psycopg
import pytest
from cake.events.v1 import admin_pb2, admin_pb2_grpc, health_pb2, health_pb2_grpc
from cake_common.grpc_server import RunningGrpcServer
from cake_common.jwt import jwk_from_public_key
from cake_devtools.stack.services import OUTBOX_SOURCES
from cake_events.bootstrap import start_server
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

pytestmark = pytest.mark.integration

KID = "events-admin-test"


class Tokens:
    def __init__(self, directory: Path) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.jwks_file = directory / "jwks.json"
        self.jwks_file.write_text(
            json.dumps({"keys": [jwk_from_public_key(self._key.public_key(), KID)]})
        )

    def bearer(self, role: str) -> tuple[tuple[str, str], ...]:
        now = int(time.time())
        token = jwt.encode(
            {
                "sub": "7",
                "role": role,
                "iss": "cake-system",
                "aud": "cake-users",
                "iat": now,
                "exp": now + 600,
                "jti": str(uuid.uuid4()),
                "sid": uuid.uuid4().hex,
            },
            self._key,
            algorithm="ES256",
            headers={"kid": KID},
        )
        return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    return Tokens(tmp_path)


async def fix_payloads(libpq_url: str, payload: bytes) -> None:
    async with await psycopg.AsyncConnection.connect(libpq_url) as conn:
        await conn.execute(
            "UPDATE outbox SET payload = %s WHERE dead_lettered_at IS NOT NULL", (payload,)
        )


@pytest.fixture
async def service(
    kit: Any, make_source_db: Any, relay_settings: Any, tokens: Tokens
) -> AsyncIterator[tuple[RunningGrpcServer, Any, Any]]:
    auth, promotions = make_source_db(), make_source_db()
    settings = relay_settings(
        auth=auth,
        promotions=promotions,
        grpc_port=0,
        jwks_file=tokens.jwks_file,
        relay_max_attempts=2,
        health_probe_timeout_seconds=0.3,
        metrics_port=0,
    )
    running = await start_server(settings, metrics_registry=CollectorRegistry())
    try:
        yield running, auth, promotions
    finally:
        await running.stop()


async def test_admin_rpcs_need_an_admin_token_and_manage_the_relay(
    kit: Any,
    service: tuple[RunningGrpcServer, Any, Any],
    tokens: Tokens,
    topic_routes: dict[str, str],
    kafka_bootstrap: str,
) -> None:
    running, auth, promotions = service
    user_rows = [kit.event_row("USER_FIRST_LOGIN", user_id=i) for i in range(1, 4)]
    promotion_rows = [kit.event_row("VOUCHER_ISSUED", user_id=i) for i in range(1, 3)]
    broken = {
        "auth": kit.OutboxRow(
            uuid.uuid4(), "USER_FIRST_LOGIN", "50", b"\x0a\xff", "cake.events.v1.UserFirstLogin"
        ),
        "promotions": kit.OutboxRow(
            uuid.uuid4(), "VOUCHER_USED", "60", b"\x0a\xff", "cake.events.v1.VoucherUsed"
        ),
    }
    await kit.write_rows(auth, [*user_rows, broken["auth"]])
    await kit.write_rows(promotions, [*promotion_rows, broken["promotions"]])

    async def settled() -> bool:
        states = [await kit.outbox_state(auth), await kit.outbox_state(promotions)]
        return [(s["published"], s["dead"]) for s in states] == [(3, 1), (2, 1)]

    await kit.wait_until(settled, what="relay to publish and park the broken rows")

    admin = tokens.bearer("admin")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = admin_pb2_grpc.EventAdminServiceStub(channel)

        # Who may call: no token, a user's token, an admin's token.
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await stub.GetQueueStats(admin_pb2.GetQueueStatsRequest())
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for call, request in (
            (stub.GetQueueStats, admin_pb2.GetQueueStatsRequest()),
            (stub.RetryFailed, admin_pb2.RetryFailedRequest()),
            (stub.ListDeadLetters, admin_pb2.ListDeadLettersRequest()),
            (stub.ReplayEvent, admin_pb2.ReplayEventRequest(event_id=str(uuid.uuid4()))),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as user:
                await call(request, metadata=tokens.bearer("user"))  # type: ignore[operator]
            assert user.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # The health report stays public.
        health = await health_pb2_grpc.SystemHealthServiceStub(channel).GetSystemHealth(
            health_pb2.GetSystemHealthRequest()
        )
        assert health.status in {"healthy", "degraded", "unhealthy"}

        stats = await stub.GetQueueStats(admin_pb2.GetQueueStatsRequest(), metadata=admin)
        assert stats.user_events == admin_pb2.QueueStats(waiting=0, active=0, completed=3, failed=1)
        assert stats.promotion_events == admin_pb2.QueueStats(
            waiting=0, active=0, completed=2, failed=1
        )
        # The same figures per configured source, with the topics the configuration gives.
        assert [(s.source, list(s.topics), s.stats) for s in stats.sources] == [
            ("auth", list(OUTBOX_SOURCES["auth"]), stats.user_events),
            ("promotions", list(OUTBOX_SOURCES["promotions"]), stats.promotion_events),
        ]

        # Dead letters, newest first, one per page.
        first_page = await stub.ListDeadLetters(
            admin_pb2.ListDeadLettersRequest(page_size=1), metadata=admin
        )
        assert len(first_page.dead_letters) == 1
        assert first_page.next_page_token
        second_page = await stub.ListDeadLetters(
            admin_pb2.ListDeadLettersRequest(page_size=1, page_token=first_page.next_page_token),
            metadata=admin,
        )
        assert len(second_page.dead_letters) == 1
        assert not second_page.next_page_token
        letters = {d.event_id: d for d in [*first_page.dead_letters, *second_page.dead_letters]}
        assert set(letters) == {str(row.event_id) for row in broken.values()}
        newest, older = first_page.dead_letters[0], second_page.dead_letters[0]
        assert newest.failed_at.ToDatetime() >= older.failed_at.ToDatetime()
        auth_letter = letters[str(broken["auth"].event_id)]
        assert (auth_letter.source, auth_letter.type, auth_letter.aggregate_id) == (
            "auth",
            "USER_FIRST_LOGIN",
            "50",
        )
        assert auth_letter.topic == topic_routes["USER_FIRST_LOGIN"]
        assert auth_letter.attempts == 2
        assert "not a valid" in auth_letter.last_error
        with pytest.raises(grpc.aio.AioRpcError) as bad_token:
            await stub.ListDeadLetters(
                admin_pb2.ListDeadLettersRequest(page_token="garbage"), metadata=admin
            )
        assert bad_token.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # Fixed rows go out again after retry-failed.
        await fix_payloads(
            auth.owner_libpq_url, kit.payload_for("USER_FIRST_LOGIN", 50, 0).SerializeToString()
        )
        await fix_payloads(
            promotions.owner_libpq_url, kit.payload_for("VOUCHER_USED", 60, 0).SerializeToString()
        )
        retried = await stub.RetryFailed(admin_pb2.RetryFailedRequest(), metadata=admin)
        assert retried.retried_count == 2

        async def all_out() -> bool:
            states = [await kit.outbox_state(auth), await kit.outbox_state(promotions)]
            return [(s["published"], s["dead"]) for s in states] == [(4, 0), (3, 0)]

        await kit.wait_until(all_out, what="retried events published")
        stats = await stub.GetQueueStats(admin_pb2.GetQueueStatsRequest(), metadata=admin)
        assert stats.user_events == admin_pb2.QueueStats(completed=4)
        assert stats.promotion_events == admin_pb2.QueueStats(completed=3)
        empty = await stub.ListDeadLetters(admin_pb2.ListDeadLettersRequest(), metadata=admin)
        assert list(empty.dead_letters) == []

        # Replay a published event: it goes through the outbox and Kafka again.
        replayed = user_rows[0].event_id
        reply = await stub.ReplayEvent(
            admin_pb2.ReplayEventRequest(event_id=str(replayed)), metadata=admin
        )
        assert (reply.event_id, reply.status) == (str(replayed), "pending")

        async def replay_published() -> bool:
            delivered = await kit.read_topics(kafka_bootstrap, [topic_routes["USER_FIRST_LOGIN"]])
            return delivered.event_ids().count(replayed) == 2

        await kit.wait_until(replay_published, what="the replayed event on Kafka")

        for event_id, code in (
            (str(uuid.uuid4()), grpc.StatusCode.NOT_FOUND),
            ("not-a-uuid", grpc.StatusCode.INVALID_ARGUMENT),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.ReplayEvent(
                    admin_pb2.ReplayEventRequest(event_id=event_id), metadata=admin
                )
            assert missing.value.code() == code

    # The relay's metrics are served with the service's on the metrics endpoint.
    assert running.metrics_port is not None
    async with httpx.AsyncClient() as client:
        scrape = await client.get(f"http://127.0.0.1:{running.metrics_port}/metrics")
    topic = topic_routes["USER_FIRST_LOGIN"]
    assert f'cake_events_relay_published_total{{source="auth",topic="{topic}"}} 5.0' in scrape.text
    assert 'cake_events_relay_dead_lettered_total{source="auth"' in scrape.text
    assert 'cake_events_relay_active{source="auth"} 1.0' in scrape.text
