"""Profiles answered from the auth workers' memory, through the gateway, on the running test
stack (several auth workers behind Envoy, real Redis): a profile read shows the login of the
token it carries at once, whichever worker answers, and another session of the same user sees
that login within the followers' half-second bound."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
from cake_devtools.stack import Stack
from cake_devtools.stack.settings import load_settings
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e

PASSWORD = "memory-pass-1"
STREAM_BOUND_SECONDS = 0.5
"""How far behind a worker's follower may be and still answer from memory."""


def _memory_answers(metrics_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "cake_auth_profile_cache_lookups_total"
        and sample.labels.get("result") == "memory"
    )


def _latest_login(client: httpx.Client, token: str) -> str:
    answer = client.get("/auth/profile", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.text
    latest: str = answer.json()["latestLogin"]
    return latest


def _login(client: httpx.Client, username: str) -> tuple[str, str]:
    answer = client.post("/auth/login", json={"account": username, "password": PASSWORD})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    return body["access_token"], body["user"]["latestLogin"]


def test_a_profile_read_shows_its_tokens_login_and_other_sessions_catch_up(
    full_stack: Stack,
) -> None:
    metrics_port = load_settings("test").auth_metrics_port
    username = f"mem_{uuid.uuid4().hex[:10]}"
    with httpx.Client(base_url=full_stack.gateway_url, timeout=30) as client:
        registered = client.post(
            "/auth/register",
            json={
                "fullname": "Memory Tester",
                "email": f"{username}@example.com",
                "username": username,
                "phone": "+849" + str(uuid.uuid4().int)[:9],
                "password": PASSWORD,
                "birthday": "1990-05-06",
            },
        )
        assert registered.status_code == 201, registered.text

        old_token, first_login = _login(client, username)
        # A second after its iat, this token's reads may be answered from memory: fill the
        # workers' copies (the gateway spreads the reads over them).
        time.sleep(1.2)
        before = _memory_answers(metrics_port)
        assert {_latest_login(client, old_token) for _ in range(20)} == {first_login}
        assert _memory_answers(metrics_port) > before, "no read was answered from memory"

        previous = first_login
        for _ in range(3):
            time.sleep(1.2)  # each login in a later second than the one before
            new_token, this_login = _login(client, username)
            assert this_login != previous
            # The token's own login shows at once, on every worker.
            for _ in range(10):
                assert _latest_login(client, new_token) == this_login
            # The older session: every worker drops its copy within the followers' bound.
            deadline = time.monotonic() + STREAM_BOUND_SECONDS
            while True:
                sent = time.monotonic()
                if _latest_login(client, old_token) == this_login:
                    break
                assert sent < deadline, "a read sent after the bound got an older copy"
            assert {_latest_login(client, old_token) for _ in range(10)} == {this_login}
            previous = this_login
