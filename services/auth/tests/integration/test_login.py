"""Login through gRPC against PostgreSQL and Redis: accounts, throttling, first-login outbox."""

from __future__ import annotations

import asyncio
from datetime import UTC
from typing import Any

import grpc
import jwt
import pytest
import sqlalchemy as sa
from cake.auth.v1 import auth_pb2, auth_pb2_grpc
from cake.events.v1 import payloads_pb2
from cake_auth.adapters.tables import outbox, users
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery"


def login(account: str, password: str = PASSWORD) -> auth_pb2.LoginRequest:
    return auth_pb2.LoginRequest(account=account, password=password)


async def _outbox_rows(database: AsyncEngine, user_id: int) -> list[Any]:
    async with database.connect() as connection:
        result = await connection.execute(
            sa.select(outbox).where(outbox.c.aggregate_id == str(user_id)).order_by(outbox.c.id)
        )
        return list(result.all())


async def test_login_by_username_email_or_phone_in_any_spelling(auth: Any) -> None:
    user = (await auth.register()).user
    spaced_phone = f"{user.phone[:3]} {user.phone[3:6]}-{user.phone[6:]}"
    for account in (user.username, user.username.upper(), user.email.upper(), spaced_phone):
        response = await auth.stub.Login(login(account))
        assert response.user.id == user.id
        claims = jwt.decode(response.access_token, options={"verify_signature": False})
        assert claims["sub"] == str(user.id)


async def test_wrong_password_and_unknown_account_look_the_same(auth: Any) -> None:
    user = (await auth.register()).user
    for request in (
        login(user.username, "wrong password"),
        login("nobody-at-all"),
        login(user.username, PASSWORD + "x" * 60),  # over bcrypt's 72 bytes
    ):
        error = await auth.failure(auth.stub.Login(request))
        assert error.code == grpc.StatusCode.UNAUTHENTICATED
        assert (error.message, error.reason) == ("Invalid credentials", "INVALID_CREDENTIALS")


async def test_first_login_writes_one_outbox_event_later_logins_none(
    auth: Any, database: AsyncEngine
) -> None:
    user = (await auth.register()).user
    channel = grpc.aio.insecure_channel(
        auth.address, options=[("grpc.primary_user_agent", "CakeApp/2.1")]
    )
    try:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        first = await stub.Login(
            login(user.username),
            metadata=(("x-cake-client-ip", "203.0.113.7"),),
        )
        second = await stub.Login(login(user.username))
    finally:
        await channel.close()

    (row,) = await _outbox_rows(database, user.id)
    assert (row.event_type, row.aggregate_type, row.payload_type) == (
        "USER_FIRST_LOGIN",
        "user",
        "cake.events.v1.UserFirstLogin",
    )
    assert row.published_at is None
    event = payloads_pb2.UserFirstLogin.FromString(row.payload)
    assert event.user_id == user.id
    assert event.login_at == first.user.latest_login
    assert event.client_ip == "203.0.113.7"
    assert event.user_agent.startswith("CakeApp/2.1")
    assert row.occurred_at == first.user.latest_login.ToDatetime(tzinfo=UTC)

    assert second.user.latest_login.ToDatetime() > first.user.latest_login.ToDatetime()
    async with database.connect() as connection:
        stored = (
            await connection.execute(sa.select(users.c.latest_login).where(users.c.id == user.id))
        ).scalar_one()
    assert stored == second.user.latest_login.ToDatetime(tzinfo=UTC)


async def test_twenty_concurrent_first_logins_write_exactly_one_event(
    start_auth_server: Any, database: AsyncEngine
) -> None:
    # The account's throttle counts logins in flight as failures until their verdict (so
    # that concurrent guesses cannot slip past it): twenty at once of one account would be
    # throttled whenever more than five reach it before the first succeeds. This test is
    # about the first-login event, so the allowance is out of the way.
    auth = await start_auth_server(login_max_failures=100)
    user = (await auth.register()).user
    channels = [grpc.aio.insecure_channel(auth.address) for _ in range(20)]
    try:
        responses = await asyncio.gather(
            *(
                auth_pb2_grpc.AuthServiceStub(channel).Login(login(user.username))
                for channel in channels
            )
        )
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    assert {response.user.id for response in responses} == {user.id}
    rows = await _outbox_rows(database, user.id)
    assert len(rows) == 1
    login_times = {response.user.latest_login.ToDatetime(tzinfo=UTC) for response in responses}
    assert rows[0].occurred_at in login_times


async def test_failed_logins_grow_delays_per_account(start_auth_server: Any) -> None:
    server = await start_auth_server(
        login_max_failures=3, login_delay_base_seconds=30, login_delay_max_seconds=60
    )
    user = (await server.register()).user
    other = (await server.register()).user
    # Username, e-mail and phone name one account: one counter.
    for account in (user.username, user.email, user.phone):
        error = await server.failure(server.stub.Login(login(account, "wrong")))
        assert error.code == grpc.StatusCode.UNAUTHENTICATED
    # Now even the right password must wait, however the account is spelled.
    for account in (user.username.upper(), user.email):
        error = await server.failure(server.stub.Login(login(account)))
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.message == "Too many failed login attempts, try again later"
        assert error.reason == "LOGIN_THROTTLED"
        assert 0 < int(error.metadata["retry_after_seconds"]) <= 30
    # Other accounts are not affected.
    await server.stub.Login(login(other.username))
    assert server.counter("cake_auth_logins_total", result="throttled") == 2
    assert server.counter("cake_auth_logins_total", result="invalid_credentials") == 3


async def test_the_owner_gets_in_after_the_delay(start_auth_server: Any) -> None:
    server = await start_auth_server(
        login_max_failures=2, login_delay_base_seconds=1, login_delay_max_seconds=1
    )
    user = (await server.register()).user
    for _ in range(5):  # the attacker keeps trying: each costs at most a second's wait
        await server.failure(server.stub.Login(login(user.username, "wrong")))
        await asyncio.sleep(1.05)
    # No lock-out: once the (capped) delay has passed, the owner logs in.
    await server.stub.Login(login(user.username))


async def test_successful_login_resets_the_failure_count(start_auth_server: Any) -> None:
    server = await start_auth_server(login_max_failures=3)
    user = (await server.register()).user
    for _ in range(3):
        for _ in range(2):
            await server.failure(server.stub.Login(login(user.email, "wrong")))
        await server.stub.Login(login(user.email))


async def test_concurrent_guesses_are_counted_before_the_hash_is_checked(
    start_auth_server: Any,
) -> None:
    server = await start_auth_server(login_max_failures=10, login_delay_base_seconds=60)
    user = (await server.register()).user
    spellings = (user.username, user.email, user.phone, user.username.upper())
    results = await asyncio.gather(
        *(
            server.failure(server.stub.Login(login(spellings[n % 4], f"guess-{n}")))
            for n in range(40)
        )
    )
    codes = [result.code for result in results]
    # Exactly the free allowance reached bcrypt; the rest waited, whatever the spelling.
    assert codes.count(grpc.StatusCode.UNAUTHENTICATED) == 10
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 30
    assert server.counter("cake_auth_logins_total", result="invalid_credentials") == 10


async def test_failures_are_also_counted_per_client_ip(start_auth_server: Any) -> None:
    server = await start_auth_server(login_ip_max_failures=3, login_delay_base_seconds=60)
    ip = (("x-cake-client-ip", "203.0.113.77"),)
    for _ in range(3):  # three different accounts from one address
        user = (await server.register()).user
        await server.failure(server.stub.Login(login(user.username, "wrong"), metadata=ip))
    fresh = (await server.register()).user
    error = await server.failure(server.stub.Login(login(fresh.username), metadata=ip))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Another address is not affected.
    other_ip = (("x-cake-client-ip", "203.0.113.78"),)
    await server.stub.Login(login(fresh.username), metadata=other_ip)


async def test_login_counters_are_served_on_the_metrics_port(start_auth_server: Any) -> None:
    import urllib.request

    server = await start_auth_server(metrics_port=0)
    user = (await server.register()).user
    await server.stub.Login(login(user.username))
    await server.failure(server.stub.Login(login(user.username, "wrong")))

    def scrape() -> str:
        url = f"http://127.0.0.1:{server.running.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            body: bytes = response.read()
            return body.decode()

    text = await asyncio.to_thread(scrape)
    assert 'cake_auth_logins_total{result="success"} 1.0' in text
    assert 'cake_auth_logins_total{result="invalid_credentials"} 1.0' in text
    assert "cake_auth_first_logins_total 1.0" in text
