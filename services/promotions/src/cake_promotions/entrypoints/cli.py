"""``cake-promotions``: run the promotions service and its operator commands."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

from cake_common.migrations import run_alembic_upgrade
from cake_common.service_runtime import start_logging

from cake_promotions.bootstrap import MIGRATIONS, consume, serve
from cake_promotions.settings import PromotionsSettings


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cake-promotions", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "serve",
        help="migrate the database, then serve gRPC (and consume first logins) until SIGTERM",
    )
    commands.add_parser(
        "consume", help="migrate the database, then only consume first-login events until SIGTERM"
    )
    commands.add_parser("migrate", help="apply database migrations and exit")
    args = parser.parse_args(argv)

    settings = PromotionsSettings()
    if args.command == "serve":
        asyncio.run(serve(settings))
    elif args.command == "consume":
        asyncio.run(consume(settings))
    elif args.command == "migrate":
        start_logging(settings)
        run_alembic_upgrade(settings.database_url, MIGRATIONS, settings.relay_role)
