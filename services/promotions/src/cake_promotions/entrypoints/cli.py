"""``cake-promotions``: run the promotions service and its operator commands."""

from __future__ import annotations

from collections.abc import Sequence

from cake_common.migrations import run_alembic_upgrade
from cake_common.service_runtime import run_service_cli

from cake_promotions.bootstrap import MIGRATIONS, consume, serve
from cake_promotions.settings import PromotionsSettings


def main(argv: Sequence[str] | None = None) -> None:
    run_service_cli(
        argv,
        prog="cake-promotions",
        description=__doc__,
        settings=PromotionsSettings,
        processes={
            "serve": (
                "migrate the database, then serve gRPC (and consume first logins) until SIGTERM",
                serve,
            ),
            "consume": (
                "migrate the database, then only consume first-login events until SIGTERM",
                consume,
            ),
        },
        migrate=lambda settings: run_alembic_upgrade(
            settings.database_url, MIGRATIONS, settings.relay_role
        ),
    )
