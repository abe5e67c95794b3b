"""End-to-end: ``GET /health`` through Envoy reflects every component, and recovers.

The stack is real (PostgreSQL, Redis, Kafka, the services, Envoy); this test stops Redis,
PostgreSQL and the notifications service for real and starts them again, without restarting
anything else.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from cake_devtools.stack import Stack

pytestmark = pytest.mark.e2e

COMPONENTS = (
    "auth",
    "promotions",
    "notifications",
    "events",
    "auth_database",
    "promotions_database",
    "notifications_database",
    "events_database",
    "redis",
    "kafka",
)


def get_health(stack: Stack) -> httpx.Response:
    return httpx.get(f"{stack.gateway_url}/health", timeout=5)


def wait_for_health(
    stack: Stack, accept: Callable[[httpx.Response, dict[str, Any]], bool], *, timeout: float = 60
) -> tuple[httpx.Response, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    last: tuple[httpx.Response, dict[str, Any]] | None = None
    while time.monotonic() < deadline:
        try:
            response = get_health(stack)
            body = response.json()
        except (httpx.HTTPError, ValueError):
            time.sleep(0.5)
            continue
        last = (response, body)
        if accept(response, body):
            return last
        time.sleep(0.5)
    detail = f"{last[0].status_code} {last[1]}" if last else "no answer"
    raise AssertionError(f"/health did not reach the expected state in {timeout}s: {detail}")


def is_healthy(response: httpx.Response, body: dict[str, Any]) -> bool:
    return response.status_code == 200 and body.get("status") == "healthy"


def test_every_component_is_reported_healthy(full_stack: Stack) -> None:
    response, body = wait_for_health(full_stack, is_healthy)
    assert response.headers["content-type"].startswith("application/json")
    for component in COMPONENTS:
        assert body["checks"][component] == "healthy", (component, body)
    assert body["checks"]["database"] == "healthy"
    assert body["checks"]["cache"] == "healthy"
    assert body["uptime"] > 0
    assert body["timestamp"].endswith("Z")
    assert body["memory"]["used"] > 0


def test_redis_down_is_degraded_then_healthy_again(full_stack: Stack) -> None:
    wait_for_health(full_stack, is_healthy)
    full_stack.stop("redis")
    try:
        _, body = wait_for_health(
            full_stack,
            lambda r, b: r.status_code == 200 and b.get("status") == "degraded",
            timeout=30,
        )
        assert body["checks"]["redis"] == "unhealthy"
        assert "redis" in body["error"]
        for component in COMPONENTS:
            if component != "redis":
                assert body["checks"][component] == "healthy", (component, body)
    finally:
        full_stack.start("redis")
    wait_for_health(full_stack, is_healthy, timeout=60)


def test_notifications_down_is_degraded_then_healthy_again(full_stack: Stack) -> None:
    """Notifications is reported like the other services, but is not critical: its work is
    asynchronous (Kafka keeps the events), so the system is degraded, not unhealthy (200)."""
    wait_for_health(full_stack, is_healthy)
    full_stack.down(["notifications"])
    try:
        _, body = wait_for_health(
            full_stack,
            lambda r, b: r.status_code == 200 and b.get("status") == "degraded",
            timeout=30,
        )
        assert body["checks"]["notifications"] == "unhealthy", body
        assert body["checks"]["notifications_database"] == "unhealthy", body
        assert "notifications" in body["error"]
        for component in COMPONENTS:
            if not component.startswith("notifications"):
                assert body["checks"][component] == "healthy", (component, body)
    finally:
        Stack(profile=full_stack.profile, echo=None).up(["notifications"])
    wait_for_health(full_stack, is_healthy, timeout=60)


def test_postgres_down_is_unhealthy_503_then_healthy_again(full_stack: Stack) -> None:
    wait_for_health(full_stack, is_healthy)
    full_stack.stop("postgres")
    try:
        _, body = wait_for_health(
            full_stack,
            lambda r, b: r.status_code == 503 and b.get("status") == "unhealthy",
            timeout=30,
        )
    finally:
        full_stack.start("postgres")
    assert body["status"] == "unhealthy"
    # Recovery happens without restarting any service: pools reconnect, health flips back.
    wait_for_health(full_stack, is_healthy, timeout=90)
    # /health asks the services; the gateway routes to them after its next health check.
    full_stack.wait_gateway_routing()


def test_a_restarted_service_is_reachable_through_the_gateway_once_up_returns(
    full_stack: Stack,
) -> None:
    """``up`` waits for Envoy to route to what it started: once Envoy's health checks have
    marked auth down, the gateway's JWKS route (auth, public) answers 200 right after
    ``up`` returns, not 503 "no healthy upstream" until the next health check."""
    full_stack.wait_gateway_routing(["auth"])
    full_stack.down(["auth"])
    try:
        deadline = time.monotonic() + 30
        while "/failed_active_hc" not in full_stack.gateway_health_flags().get("auth", ""):
            assert time.monotonic() < deadline, "Envoy never marked auth unhealthy"
            time.sleep(0.2)
    finally:
        echoed: list[str] = []
        Stack(profile=full_stack.profile, echo=echoed.append).up(["auth"])
    # up waited for Envoy itself (not the few hundred ms of this test's own calls):
    assert any(line.split()[:3] == ["envoy", "routes", "to"] for line in echoed), echoed
    # One flag per auth worker process (each its own endpoint), every one healthy.
    assert set(full_stack.gateway_health_flags()["auth"].split(",")) == {"healthy"}
    response = httpx.get(f"{full_stack.gateway_url}/.well-known/jwks.json", timeout=5)
    assert response.status_code == 200, response.text
    assert response.json()["keys"]


def test_cake_stack_restart_and_logs_one_component(
    full_stack: Stack, capfd: pytest.CaptureFixture[str]
) -> None:
    """``cake-stack restart auth`` gives auth a new process that the gateway routes to when
    the command returns; ``cake-stack logs auth -n 5`` prints the end of its log."""
    from cake_devtools.stack.cli import main

    before = full_stack.status()["auth"].pid
    assert main(["restart", "auth", "--profile", full_stack.profile]) == 0
    after = full_stack.status()["auth"]
    assert after.pid is not None and after.pid != before
    assert after.healthy
    # One flag per auth worker process (each its own endpoint), every one healthy.
    assert set(full_stack.gateway_health_flags()["auth"].split(",")) == {"healthy"}
    response = httpx.get(f"{full_stack.gateway_url}/.well-known/jwks.json", timeout=5)
    assert response.status_code == 200, response.text

    capfd.readouterr()
    assert main(["logs", "auth", "-n", "5", "--profile", full_stack.profile]) == 0
    printed = capfd.readouterr().out.splitlines()
    # Five lines of auth's log, in order (it may have written more since).
    assert len(printed) == 5
    log = full_stack.log_paths(["auth"])["auth"].read_text()
    assert "\n".join(printed) in log

    assert main(["logs", "auth", "-n", "-1", "--profile", full_stack.profile]) == 1
    assert "--lines must be 0 or more" in capfd.readouterr().err
