"""``cake-notifications``: run the notifications service (or the local SMTP sink)."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from pathlib import Path

from cake_common.migrations import run_alembic_upgrade
from cake_common.service_runtime import start_logging


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cake-notifications", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="migrate, then serve gRPC, consume and send until SIGTERM")
    commands.add_parser("migrate", help="apply database migrations and exit")
    sink = commands.add_parser(
        "smtp-sink", help="a local SMTP server storing every message as a file (dev and tests)"
    )
    sink.add_argument("--host", default="127.0.0.1")
    sink.add_argument("--port", type=int, default=1025)
    sink.add_argument("--directory", type=Path, required=True)
    args = parser.parse_args(argv)

    if args.command == "smtp-sink":
        from cake_notifications.entrypoints.smtp_sink import serve_sink

        asyncio.run(serve_sink(args.host, args.port, args.directory))
        return

    from cake_notifications.bootstrap import MIGRATIONS, serve
    from cake_notifications.settings import NotificationsSettings

    settings = NotificationsSettings()
    if args.command == "serve":
        asyncio.run(serve(settings))
    elif args.command == "migrate":
        start_logging(settings)
        run_alembic_upgrade(settings.database_url, MIGRATIONS, None)
