"""``cake-events``: run the events service and its operator commands."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

from cake_common.migrations import run_alembic_upgrade
from cake_common.service_runtime import start_logging

from cake_events.bootstrap import MIGRATIONS, relay_only, serve
from cake_events.settings import EventsSettings


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cake-events", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "serve", help="migrate the database, then serve gRPC and run the outbox relay until SIGTERM"
    )
    commands.add_parser(
        "relay", help="migrate the database, then run only the outbox relay until SIGTERM"
    )
    commands.add_parser("migrate", help="apply database migrations and exit")
    args = parser.parse_args(argv)

    settings = EventsSettings()
    if args.command == "serve":
        asyncio.run(serve(settings))
    elif args.command == "relay":
        asyncio.run(relay_only(settings))
    elif args.command == "migrate":
        start_logging(settings)
        run_alembic_upgrade(settings.database_url, MIGRATIONS)
