"""Overload at the auth service's hash queue, seen through the gateway: a login burst far
beyond what the hashing threads can take gets some answers and, for the rest, an immediate
503 with ``Retry-After`` (the rich error's retry-after header, passed on by Envoy), and no
request runs into the client's timeout.

The stack's auth service runs with its defaults (cost 10, a hashing thread per core, a queue
of what the threads are measured to finish in a second), so a burst of three times what it
admits at once (its ``cake_auth_hash_admission_limit``, summed over the workers) overflows it.
"""

from __future__ import annotations

import asyncio
import random
import uuid

import httpx
import pytest
from cake_devtools.stack import Stack
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e

PASSWORD = "Gateway-overload-1"
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


def admitted_at_once(metrics_port: int) -> int:
    """What the stack's auth service admits at once now, over all its workers."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "cake_auth_hash_admission_limit":
            return int(sum(sample.value for sample in family.samples))
    raise AssertionError("auth exports no cake_auth_hash_admission_limit")


def _source_address() -> str:
    """A loopback address of its own: the login throttle's per-IP count starts at zero there,
    whatever other tests (or an earlier run) did from 127.0.0.1."""
    octets = random.SystemRandom().randrange(1, 250), random.SystemRandom().randrange(2, 250)
    return f"127.{octets[0]}.{octets[1]}.7"


async def login_burst(base_url: str, burst: int) -> list[httpx.Response]:
    # One source address per account: a burst from one address would also meet the per-IP
    # login throttle (it holds a place for every attempt in flight), and this test is about
    # the hash queue's admission.
    accounts = burst // LOGINS_PER_ACCOUNT
    clients = [
        httpx.AsyncClient(
            base_url=base_url,
            timeout=CLIENT_TIMEOUT_SECONDS,
            transport=httpx.AsyncHTTPTransport(
                local_address=_source_address(),
                limits=httpx.Limits(
                    max_connections=LOGINS_PER_ACCOUNT,
                    max_keepalive_connections=LOGINS_PER_ACCOUNT,
                ),
            ),
        )
        for _ in range(accounts)
    ]
    try:
        logins: list[tuple[httpx.AsyncClient, dict[str, str]]] = []
        for client in clients:
            body = registration()
            registered = await client.post("/auth/register", json=body)
            assert registered.status_code == 201, registered.text
            login = {"account": body["username"], "password": PASSWORD}
            logins += [(client, login)] * LOGINS_PER_ACCOUNT
        # Every request raises if it times out, which fails the test.
        return list(
            await asyncio.gather(
                *(client.post("/auth/login", json=login) for client, login in logins)
            )
        )
    finally:
        for client in clients:
            await client.aclose()


def test_a_login_burst_beyond_the_hash_queue_gets_503_with_retry_after(
    full_stack: Stack,
) -> None:
    metrics_port = int(full_stack.service_environment()["auth"]["CAKE_AUTH_METRICS_PORT"])
    admitted = admitted_at_once(metrics_port)
    assert admitted >= 2, admitted  # a thread and at least one waiting, per worker
    # Three times that, so the burst overflows it on any machine.
    responses = asyncio.run(login_burst(full_stack.gateway_url, 3 * admitted))

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
