"""Alembic helpers against a real PostgreSQL: env.py helper, advisory lock, relay grants."""

from __future__ import annotations

import secrets
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from cake_common.db import libpq_url
from cake_common.migrations import run_alembic_upgrade

pytestmark = pytest.mark.integration

ENV_PY = """
from cake_common.migrations import run_migrations

run_migrations(None)
"""

FIRST_REVISION = '''
"""outbox and inbox"""
from alembic import op

from cake_common.inbox import create_inbox_table, drop_inbox_table
from cake_common.migrations import migration_relay_role
from cake_common.outbox import create_outbox_table, drop_outbox_table

revision = "0001"
down_revision = None


def upgrade() -> None:
    # Widen the race window: without the advisory lock, concurrent replicas collide here.
    op.execute("SELECT pg_sleep(0.3)")
    create_outbox_table(op, relay_role=migration_relay_role())
    create_inbox_table(op)


def downgrade() -> None:
    drop_inbox_table(op)
    drop_outbox_table(op)
'''

SECOND_REVISION = '''
"""a service table"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table("widgets", sa.Column("id", sa.Integer, primary_key=True))


def downgrade() -> None:
    op.drop_table("widgets")
'''


def _script_dir(root: Path, revisions: list[str]) -> str:
    (root / "versions").mkdir(parents=True)
    (root / "env.py").write_text(textwrap.dedent(ENV_PY))
    (root / "script.py.mako").write_text("")
    for index, source in enumerate(revisions, start=1):
        (root / "versions" / f"{index:04d}.py").write_text(source)
    return str(root)


def _query(url: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(libpq_url(url)) as connection:
        return connection.execute(sql).fetchall()


@pytest.fixture
def relay_role(postgres_url: str) -> Iterator[str]:
    role = f"cake_relay_{secrets.token_hex(3)}"
    yield role
    with psycopg.connect(libpq_url(postgres_url), autocommit=True) as connection:
        connection.execute(f"DROP OWNED BY {role}") if _role_exists(connection, role) else None
        connection.execute(f"DROP ROLE IF EXISTS {role}")


def _role_exists(connection: psycopg.Connection[tuple[object, ...]], role: str) -> bool:
    return (
        connection.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        is not None
    )


def _privileges(url: str, role: str) -> set[str]:
    rows = _query(
        url,
        "SELECT privilege_type FROM information_schema.role_table_grants "
        f"WHERE table_name = 'outbox' AND grantee = '{role}'",
    )
    return {str(row[0]) for row in rows}


def test_concurrent_upgrades_apply_once(postgres_url: str, tmp_path: Path, relay_role: str) -> None:
    scripts = _script_dir(tmp_path / "migrations", [FIRST_REVISION])
    # The role does not exist yet: the grant must be skipped, not fail.
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [
            pool.submit(run_alembic_upgrade, postgres_url, scripts, relay_role) for _ in range(4)
        ]
        for future in futures:
            future.result()

    assert _query(postgres_url, "SELECT version_num FROM alembic_version") == [("0001",)]
    tables = {
        row[0]
        for row in _query(
            postgres_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        )
    }
    assert {"outbox", "inbox", "alembic_version"} <= tables
    assert _privileges(postgres_url, relay_role) == set()

    # The role appears later (e.g. created by the relay's own set-up): the next upgrade
    # grants it, although no migration runs.
    with psycopg.connect(libpq_url(postgres_url), autocommit=True) as connection:
        connection.execute(f"CREATE ROLE {relay_role} NOLOGIN")
    run_alembic_upgrade(postgres_url, scripts, relay_role)
    assert _privileges(postgres_url, relay_role) == {"SELECT", "UPDATE", "DELETE"}

    # A later revision is applied on top.
    (Path(scripts) / "versions" / "0002.py").write_text(SECOND_REVISION)
    run_alembic_upgrade(postgres_url, scripts)
    assert _query(postgres_url, "SELECT version_num FROM alembic_version") == [("0002",)]


def test_invalid_role_name_rejected(postgres_url: str, tmp_path: Path) -> None:
    scripts = _script_dir(tmp_path / "bad", [FIRST_REVISION])
    with pytest.raises(ValueError, match="relay role"):
        run_alembic_upgrade(postgres_url, scripts, "x'; DROP TABLE outbox; --")
