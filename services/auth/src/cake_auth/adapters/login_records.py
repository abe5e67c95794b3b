"""The login path's two database statements, each on its own, outside a transaction.

A login reads the account before its password is checked and records the login after; it
cannot hold one transaction through the hash queue. Run through a unit of work, the read
costs four round trips (the pool's ping, BEGIN, SELECT, ROLLBACK) and the record of a
repeat login five (ping, BEGIN, UPDATE users, INSERT session and refresh token, COMMIT).
Here each is one statement in autocommit mode, two round trips with the ping: PostgreSQL
makes a single statement atomic, data-modifying CTEs included, so nothing is lost.

A first login stays in the unit of work: its outbox event must commit with
``latest_login``, and the outbox writer adds its own statement.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from cake_auth.adapters.tables import refresh_tokens, sessions, users
from cake_auth.adapters.users_repository import (
    FIND_FOR_LOGIN,
    USER_COLUMNS,
    user_from_row,
)
from cake_auth.domain.login import LoginAccount
from cake_auth.domain.sessions import Session
from cake_auth.domain.users import User


def _record_repeat_login_statement() -> sa.Select[Any]:
    """``latest_login`` of a user who has logged in before, and the new session with its
    first refresh token, in one statement (built once, see users_repository)::

        WITH login_user AS (UPDATE users … RETURNING …),
             login_session AS (INSERT INTO sessions SELECT … FROM login_user RETURNING …),
             login_refresh_token AS (INSERT INTO refresh_tokens SELECT … FROM login_session)
        SELECT … FROM login_user

    No row: the user is gone (deleted since the password check), and nothing was written.
    No bound parameter is named after a column of ``users``: SQLAlchemy would take it as a
    value to SET in the UPDATE.
    """
    at = sa.bindparam("at", type_=users.c.latest_login.type)
    login_user = (
        sa.update(users)
        .where(users.c.id == sa.bindparam("user_id", type_=users.c.id.type))
        .values(latest_login=at, updated_at=at, version=users.c.version + 1)
        .returning(*USER_COLUMNS)
        .cte("login_user")
    )
    login_session = (
        sa.insert(sessions)
        .from_select(
            ["id", "user_id", "created_at", "expires_at", "user_agent", "client_ip"],
            sa.select(
                sa.bindparam("session_id", type_=sessions.c.id.type),
                login_user.c.id,
                at,
                sa.bindparam("expires_at", type_=sessions.c.expires_at.type),
                sa.bindparam("user_agent", type_=sessions.c.user_agent.type),
                sa.bindparam("client_ip", type_=sessions.c.client_ip.type),
            ),
        )
        .returning(sessions.c.id, sessions.c.created_at)
        .cte("login_session")
    )
    login_refresh_token = (
        sa.insert(refresh_tokens)
        .from_select(
            ["token_hash", "session_id", "issued_at"],
            sa.select(
                sa.bindparam("token_hash", type_=refresh_tokens.c.token_hash.type),
                login_session.c.id,
                login_session.c.created_at,
            ),
        )
        .cte("login_refresh_token")
    )
    return sa.select(*(login_user.c[column.name] for column in USER_COLUMNS)).add_cte(
        login_refresh_token
    )


_RECORD_REPEAT_LOGIN = _record_repeat_login_statement()


class SqlLoginRecords:
    """The login path's statements on the service's engine, each committed on its own."""

    def __init__(self, engine: AsyncEngine) -> None:
        # Shares the engine's pool; a connection is in autocommit mode while checked out
        # by this class (psycopg sends no BEGIN or COMMIT) and back to the default after.
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")

    async def find_for_login(self, account: LoginAccount) -> tuple[User, str] | None:
        parameters = {"lowered": account.lowered, "phone": account.phone}
        async with self._engine.connect() as connection:
            row = (await connection.execute(FIND_FOR_LOGIN, parameters)).one_or_none()
        return None if row is None else (user_from_row(row), row.password_hash)

    async def record_repeat_login(
        self, new: Session, *, refresh_hash: str, user_agent: str, client_ip: str
    ) -> User | None:
        parameters = {
            "user_id": new.user_id,
            "at": new.created_at,
            "session_id": new.id,
            "expires_at": new.expires_at,
            "user_agent": user_agent,
            "client_ip": client_ip,
            "token_hash": refresh_hash,
        }
        async with self._engine.connect() as connection:
            row = (await connection.execute(_RECORD_REPEAT_LOGIN, parameters)).one_or_none()
        return None if row is None else user_from_row(row)
