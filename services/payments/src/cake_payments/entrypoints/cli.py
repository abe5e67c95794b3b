"""``cake-payments``: run the bank simulator."""

from __future__ import annotations

from collections.abc import Sequence

from cake_common.migrations import run_alembic_upgrade
from cake_common.service_runtime import run_service_cli

from cake_payments.bootstrap import MIGRATIONS, serve
from cake_payments.settings import PaymentsSettings


def main(argv: Sequence[str] | None = None) -> None:
    run_service_cli(
        argv,
        prog="cake-payments",
        description=__doc__,
        settings=PaymentsSettings,
        processes={"serve": ("migrate the database, then serve gRPC until SIGTERM", serve)},
        migrate=lambda settings: run_alembic_upgrade(settings.database_url, MIGRATIONS),
    )
