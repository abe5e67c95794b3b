"""Session fixtures shared by every test package: real servers, started once per test run.

The test session owns a stack of real components under the ``test`` profile (its own ports
and run directory, see ``cake_devtools.stack``), so ``make test`` works whether or not a
``make up`` stack is running. Infrastructure (PostgreSQL, Redis, Kafka) starts on first use;
the three services and Envoy start only when an end-to-end test asks for ``full_stack``.

Set ``CAKE_TEST_KEEP_STACK=1`` to leave the test stack running after the session (faster
re-runs while developing); a stack that was already running is reused and left running.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from cake_devtools.stack import Stack

INFRA = ("postgres", "redis", "kafka")
SERVICES = ("auth", "promotions", "events", "envoy")


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """The ``test`` profile stack with PostgreSQL, Redis and Kafka running."""
    from cake_devtools.stack import Stack

    test_stack = Stack(profile="test")
    already_running = {name for name, status in test_stack.status().items() if status.running}
    test_stack.up(INFRA)
    yield test_stack
    if os.environ.get("CAKE_TEST_KEEP_STACK") == "1":
        return
    started_here = [c for c in (*INFRA, *SERVICES) if c not in already_running]
    test_stack.down(started_here)


@pytest.fixture(scope="session")
def full_stack(stack: Stack) -> Stack:
    """Everything, services and Envoy included, healthy: for end-to-end tests."""
    stack.up()
    return stack


@pytest.fixture(scope="session")
def kafka_bootstrap(stack: Stack) -> str:
    return stack.kafka_bootstrap


@pytest.fixture(scope="session")
def redis_url(stack: Stack) -> str:
    return stack.redis_url


def _scratch_database(stack: Stack, label: str) -> Iterator[str]:
    """Create an empty database owned by the superuser; yield its async SQLAlchemy URL."""
    import psycopg
    from psycopg import sql

    name = "t_" + re.sub(r"[^a-z0-9]+", "_", label.lower())[-40:] + "_" + secrets.token_hex(3)
    admin_url = stack.postgres_admin_url
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = admin_url.rsplit("/", 1)[0]
    yield base.replace("postgresql://", "postgresql+psycopg://", 1) + "/" + name
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="module")
def postgres_url(stack: Stack, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty database for one test module (async SQLAlchemy URL, psycopg 3)."""
    yield from _scratch_database(stack, request.module.__name__)
