"""The start-up steps every service runs before it serves, in one place.

A service's composition root (``bootstrap.py``) calls :func:`start_logging` and
:func:`open_migrated_database`, then builds its use cases and its gRPC server.
"""

from __future__ import annotations

import asyncio

from sqlalchemy.ext.asyncio import AsyncEngine

from cake_common.db import create_async_engine_for, wait_for_database
from cake_common.logging import configure_logging, get_logger
from cake_common.migrations import run_alembic_upgrade
from cake_common.settings import ServiceSettings

_log = get_logger(__name__)


def start_logging(settings: ServiceSettings) -> None:
    configure_logging(settings.log_level, settings.log_json, service_name=settings.service_name)


async def open_migrated_database(
    settings: ServiceSettings, *, script_location: str, relay_role: str | None = None
) -> AsyncEngine:
    """An engine for the service's own database, once it answers and is migrated to head.

    Waits (with backoff, up to ``startup_retry_seconds``) instead of crashing when the
    database is not up yet, so services can start in any order.
    """
    engine = create_async_engine_for(settings.database_url, pool_size=settings.database_pool_size)
    _log.info("connecting to database", url=settings.database_url_for_display())
    await wait_for_database(engine, settings.startup_retry_seconds)
    # Alembic is synchronous: run it in a worker thread so the event loop stays free.
    await asyncio.to_thread(run_alembic_upgrade, settings.database_url, script_location, relay_role)
    return engine
