"""``cake-events``: run the events service and its operator commands."""

from __future__ import annotations

from collections.abc import Sequence

from cake_common.migrations import run_alembic_upgrade
from cake_common.service_runtime import run_service_cli

from cake_events.bootstrap import MIGRATIONS, relay, serve
from cake_events.settings import EventsSettings


def main(argv: Sequence[str] | None = None) -> None:
    run_service_cli(
        argv,
        prog="cake-events",
        description=__doc__,
        settings=EventsSettings,
        processes={
            "serve": (
                "migrate the database, then serve gRPC and run the outbox relay until SIGTERM",
                serve,
            ),
            "relay": (
                "migrate the database, then run only the outbox relay until SIGTERM",
                relay,
            ),
        },
        migrate=lambda settings: run_alembic_upgrade(settings.database_url, MIGRATIONS),
    )
