"""``cake-payments``: run the bank simulator."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

from cake_common.migrations import run_alembic_upgrade
from cake_common.service_runtime import start_logging

from cake_payments.bootstrap import MIGRATIONS, serve
from cake_payments.settings import PaymentsSettings


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cake-payments", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="migrate the database, then serve gRPC until SIGTERM")
    commands.add_parser("migrate", help="apply database migrations and exit")
    args = parser.parse_args(argv)

    settings = PaymentsSettings()
    if args.command == "serve":
        asyncio.run(serve(settings))
    elif args.command == "migrate":
        start_logging(settings)
        run_alembic_upgrade(settings.database_url, MIGRATIONS, None)
