"""Overload at the auth service's hash queue, seen through the gateway: a login burst far
beyond what the hashing threads can take gets some answers and, for the rest, an immediate
503 with ``Retry-After`` (the rich error's retry-after header, passed on by Envoy), and no
request runs into the client's timeout.

The stack's auth service runs with its defaults (cost 10, a hashing thread per core, four
waiting per thread), so a burst of three times that many concurrent logins overflows it.
"""

from __future__ import annotations

import asyncio
import random
import uuid

import httpx
import pytest
from cake_auth.adapters.password_hashers import available_cpus
from cake_auth.bootstrap import WAITING_PER_HASH_WORKER
from cake_devtools.stack import Stack

pytestmark = pytest.mark.e2e

PASSWORD = "Gateway-overload-1"
# Three times what the stack's auth service admits at once (its hashing threads, one per core,
# and four waiting for each), so the burst overflows it on any machine: 30 on two cores.
ADMITTED_AT_ONCE = available_cpus() * (1 + WAITING_PER_HASH_WORKER)
BURST = 3 * ADMITTED_AT_ONCE
# Attempts are counted per account before the check: at most the free failures (5) at once on
# one account, so that no login of the burst is throttled.
LOGINS_PER_ACCOUNT = 5
CLIENT_TIMEOUT_SECONDS = 60


def registration() -> dict[str, str]:
    username = f"overload_{uuid.uuid4().hex[:10]}"
    return {
        "fullname": "Overload Tester",
        "email": f"{username}@example.com",
        "username": username,
        "phone": "+849" + str(uuid.uuid4().int)[:9],
        "password": PASSWORD,
        "birthday": "1990-04-01",
    }


async def login_burst(base_url: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    # A source address of its own on loopback: the login throttle's per-IP count starts at
    # zero, whatever other tests (or an earlier run) did from 127.0.0.1.
    octets = random.SystemRandom().randrange(1, 250), random.SystemRandom().randrange(2, 250)
    transport = httpx.AsyncHTTPTransport(
        local_address=f"127.{octets[0]}.{octets[1]}.7", limits=limits
    )
    async with httpx.AsyncClient(
        base_url=base_url, timeout=CLIENT_TIMEOUT_SECONDS, transport=transport
    ) as client:
        logins: list[dict[str, str]] = []
        for _ in range(BURST // LOGINS_PER_ACCOUNT):
            body = registration()
            registered = await client.post("/auth/register", json=body)
            assert registered.status_code == 201, registered.text
            logins += [{"account": body["username"], "password": PASSWORD}] * LOGINS_PER_ACCOUNT
        # Every request raises if it times out, which fails the test.
        return list(
            await asyncio.gather(*(client.post("/auth/login", json=login) for login in logins))
        )


def test_a_login_burst_beyond_the_hash_queue_gets_503_with_retry_after(
    full_stack: Stack,
) -> None:
    responses = asyncio.run(login_burst(full_stack.gateway_url))

    statuses = sorted({response.status_code for response in responses})
    assert set(statuses) <= {200, 503}, statuses
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 503]
    assert served, "no login of the burst was served"
    assert refused, "no login of the burst was refused"
    for response in refused:
        assert int(response.headers["retry-after"]) >= 1
        body = response.json()
        assert body["message"] == "The server is busy, try again in a moment"
        reasons = {detail.get("reason") for detail in body["details"]}
        assert "SERVER_BUSY" in reasons, body
        assert not [name for name in response.headers if name.startswith("grpc-")]
    for response in served:
        assert response.json()["access_token"]
