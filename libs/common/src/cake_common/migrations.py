"""Running each service's Alembic migrations, safely from several replicas at once.

A service keeps ``env.py`` and ``versions/`` inside its package (``cake_auth/migrations``)
with no ``alembic.ini``; its ``env.py`` is just::

    from cake_auth.adapters.tables import metadata
    from cake_common.migrations import run_migrations

    run_migrations(metadata)

and its entry point (CLI ``migrate`` command or start-up) calls::

    run_alembic_upgrade(settings.database_url, "cake_auth:migrations", relay_role="cake_relay")

(from async code: ``await asyncio.to_thread(run_alembic_upgrade, ...)``; Alembic is sync).
"""

from __future__ import annotations

from collections.abc import Callable

from alembic import command, context
from alembic.config import Config
from pydantic import SecretStr
from sqlalchemy import Connection, MetaData, create_engine, text
from sqlalchemy.pool import NullPool

from cake_common.logging import get_logger
from cake_common.outbox import OUTBOX_TABLE_NAME, grant_outbox_to_relay_sql

# pg_advisory_xact_lock key serializing migrations of one database ("CakeMigr" in ASCII).
MIGRATION_LOCK_KEY = 0x43616B654D696772

_CONNECTION_ATTRIBUTE = "connection"
_RELAY_ROLE_ATTRIBUTE = "relay_role"

_log = get_logger(__name__)


def run_alembic_upgrade(
    url: str | SecretStr,
    script_location: str,
    relay_role: str | None = None,
    *,
    revision: str = "head",
) -> None:
    """``alembic upgrade <revision>`` in one transaction that holds an advisory lock.

    Replicas starting together queue on the lock; each then sees the version the previous
    one committed, so exactly one applies the migrations and the others find nothing to do.
    Postgres DDL is transactional, so a failed migration leaves the schema untouched.

    After upgrading, the outbox grants for ``relay_role`` are re-applied (if the table and
    the role exist): the role may have been created after the migration that made the table.
    """
    # Built first so a bad role name fails before anything is migrated.
    grant_sql = grant_outbox_to_relay_sql(relay_role) if relay_role is not None else None

    def upgrade(connection: Connection, config: Config) -> None:
        command.upgrade(config, revision)
        if grant_sql is not None and _table_exists(connection, OUTBOX_TABLE_NAME):
            connection.execute(text(grant_sql))

    _with_migration_lock(url, script_location, relay_role, upgrade)
    _log.info("database migrated", script_location=script_location, revision=revision)


def run_alembic_downgrade(url: str | SecretStr, script_location: str, revision: str) -> None:
    """``alembic downgrade <revision>``, in one transaction under the same lock as upgrades
    (for operators stepping back a release, and for tests of the downgrade steps)."""

    def downgrade(connection: Connection, config: Config) -> None:
        command.downgrade(config, revision)

    _with_migration_lock(url, script_location, None, downgrade)
    _log.info("database downgraded", script_location=script_location, revision=revision)


def _with_migration_lock(
    url: str | SecretStr,
    script_location: str,
    relay_role: str | None,
    action: Callable[[Connection, Config], None],
) -> None:
    plain_url = url.get_secret_value() if isinstance(url, SecretStr) else url
    engine = create_engine(plain_url, poolclass=NullPool, hide_parameters=True)
    try:
        with engine.begin() as connection:
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )
            config = Config()
            config.set_main_option("script_location", script_location)
            config.attributes[_CONNECTION_ATTRIBUTE] = connection
            config.attributes[_RELAY_ROLE_ATTRIBUTE] = relay_role
            action(connection, config)
    finally:
        engine.dispose()


def _table_exists(connection: Connection, name: str) -> bool:
    return (
        connection.execute(text("SELECT to_regclass(:name)"), {"name": name}).scalar() is not None
    )


def run_migrations(target_metadata: MetaData | None) -> None:
    """The whole body of a service's Alembic ``env.py``.

    Uses the connection passed by :func:`run_alembic_upgrade`; when Alembic is run from
    its own command line instead, uses ``sqlalchemy.url`` from the Alembic config (or
    renders SQL in ``--sql`` offline mode).
    """
    config = context.config
    if context.is_offline_mode():
        context.configure(
            url=config.get_main_option("sqlalchemy.url"),
            target_metadata=target_metadata,
            literal_binds=True,
            dialect_opts={"paramstyle": "named"},
        )
        with context.begin_transaction():
            context.run_migrations()
        return

    connection = config.attributes.get(_CONNECTION_ATTRIBUTE)
    if connection is not None:
        _run_online(connection, target_metadata)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection given and no sqlalchemy.url in the Alembic config")
    engine = create_engine(url, poolclass=NullPool, hide_parameters=True)
    try:
        with engine.connect() as own_connection:
            _run_online(own_connection, target_metadata)
    finally:
        engine.dispose()


def _run_online(connection: Connection, target_metadata: MetaData | None) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def migration_relay_role() -> str | None:
    """Inside a migration script: the relay role given to :func:`run_alembic_upgrade`,
    for ``create_outbox_table(op, relay_role=migration_relay_role())``."""
    role = context.config.attributes.get(_RELAY_ROLE_ATTRIBUTE)
    return role if isinstance(role, str) else None
