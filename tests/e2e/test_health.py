"""End-to-end: ``GET /health`` through Envoy reflects every component, and recovers.

The stack is real (PostgreSQL, Redis, Kafka, the three services, Envoy); this test stops
Redis and PostgreSQL for real and starts them again, without restarting anything else.
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
    "events",
    "auth_database",
    "promotions_database",
    "events_database",
    "redis",
    "kafka",
)
SERVICE_CLUSTERS = ("auth", "promotions", "events")
"""Envoy's health-checked clusters, one per service."""


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


def wait_for_gateway_upstreams(stack: Stack, *, timeout: float = 30) -> None:
    """Wait until Envoy's active health checks admit every service again.

    ``/health`` asks the services themselves, so it turns healthy up to one health-check
    interval before Envoy routes to a service it marked unhealthy during an outage; tests
    that cause an outage wait for both, so the next test finds the gateway as it was.
    """
    deadline = time.monotonic() + timeout
    flags: dict[str, str] = {}
    while time.monotonic() < deadline:
        try:
            text = httpx.get(f"{stack.gateway_admin_url}/clusters", timeout=5).text
        except httpx.HTTPError:
            time.sleep(0.2)
            continue
        # Lines read ``<cluster>::<host>::health_flags::<flags>``.
        flags = {
            line.split("::", 1)[0]: line.rsplit("::", 1)[1]
            for line in text.splitlines()
            if "::health_flags::" in line
        }
        if all(flags.get(cluster) == "healthy" for cluster in SERVICE_CLUSTERS):
            return
        time.sleep(0.2)
    raise AssertionError(f"the gateway did not route to every service in {timeout}s: {flags}")


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
    wait_for_gateway_upstreams(full_stack)


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
    wait_for_gateway_upstreams(full_stack)
