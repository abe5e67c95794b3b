"""Schema drift: each service's migrations, applied to a real PostgreSQL, give exactly the
tables its code declares (``adapters/tables.py``). Alembic's autogenerate comparison lists every
difference (tables, columns, types, nullability, server defaults, indexes, unique and
foreign keys); any difference fails with the list, so a migration without its declaration
(or the reverse) cannot land."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from cake_common.migrations import run_alembic_upgrade

pytestmark = pytest.mark.integration

SERVICES = ("auth", "promotions", "events", "payments", "notifications")


#: Where a service declares its tables, when not ``cake_<service>.db`` (the service layout
#: with ``adapters/``).
@pytest.fixture(params=SERVICES)
def service(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _include(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    # Alembic's own bookkeeping table is no declaration of ours.
    return not (type_ == "table" and name == "alembic_version")


def test_migrations_make_exactly_the_declared_tables(
    new_database: Callable[[str], str], service: str
) -> None:
    package = f"cake_{service}"
    metadata: sa.MetaData = importlib.import_module(f"{package}.adapters.tables").metadata
    url = new_database(f"drift_{service}")
    run_alembic_upgrade(url, f"{package}:migrations")
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection,
                opts={
                    "compare_type": True,
                    "compare_server_default": True,
                    "include_object": _include,
                },
            )
            differences = compare_metadata(context, metadata)
    finally:
        engine.dispose()
    assert differences == [], "\n".join(map(repr, differences))
