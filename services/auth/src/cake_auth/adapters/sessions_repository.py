"""The ``sessions`` and ``refresh_tokens`` tables, inside a unit of work's session.

Rotation and reuse detection lock the session row (``FOR UPDATE``), so concurrent
refreshes, logouts and logout-alls of one session take turns.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from cake_auth.adapters.tables import refresh_tokens, sessions
from cake_auth.domain.sessions import RefreshTokenRecord, Session


def _session_from_row(row: Any) -> Session:
    return Session(
        id=row.id,
        user_id=row.user_id,
        created_at=row.created_at,
        expires_at=row.expires_at,
        ended_at=row.ended_at,
        end_reason=row.end_reason,
    )


def _add_session_statement() -> sa.Insert:
    """The session and its first refresh token in one statement (one round trip, built
    once: see users_repository): ``WITH new AS (INSERT INTO sessions … RETURNING …)
    INSERT INTO refresh_tokens SELECT …``."""
    new_session = (
        sa.insert(sessions)
        .values(
            id=sa.bindparam("id"),
            user_id=sa.bindparam("user_id"),
            created_at=sa.bindparam("created_at"),
            expires_at=sa.bindparam("expires_at"),
            user_agent=sa.bindparam("user_agent"),
            client_ip=sa.bindparam("client_ip"),
        )
        .returning(sessions.c.id, sessions.c.created_at)
        .cte("new_session")
    )
    return sa.insert(refresh_tokens).from_select(
        ["token_hash", "session_id", "issued_at"],
        sa.select(
            sa.bindparam("token_hash", type_=refresh_tokens.c.token_hash.type),
            new_session.c.id,
            new_session.c.created_at,
        ),
    )


_ADD_SESSION = _add_session_statement()


class SqlSessionRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(
        self, new: Session, *, refresh_hash: str, user_agent: str, client_ip: str
    ) -> None:
        await self._session.execute(
            _ADD_SESSION,
            {
                "id": new.id,
                "user_id": new.user_id,
                "created_at": new.created_at,
                "expires_at": new.expires_at,
                "user_agent": user_agent,
                "client_ip": client_ip,
                "token_hash": refresh_hash,
            },
        )

    async def add_refresh_token(self, session_id: str, token_hash: str, at: datetime) -> None:
        await self._session.execute(
            sa.insert(refresh_tokens).values(
                token_hash=token_hash, session_id=session_id, issued_at=at
            )
        )

    async def get_for_update(self, session_id: str) -> Session | None:
        row = (
            await self._session.execute(
                sa.select(sessions).where(sessions.c.id == session_id).with_for_update()
            )
        ).one_or_none()
        return None if row is None else _session_from_row(row)

    async def find_refresh_token(
        self, token_hash: str
    ) -> tuple[RefreshTokenRecord, Session] | None:
        """The token and its session, the session locked for the rest of the transaction."""
        row = (
            await self._session.execute(
                sa.select(refresh_tokens).where(refresh_tokens.c.token_hash == token_hash)
            )
        ).one_or_none()
        if row is None:
            return None
        session = await self.get_for_update(row.session_id)
        if session is None:
            return None
        # Read again under the session lock: a concurrent rotation may have used it.
        used_at = (
            await self._session.execute(
                sa.select(refresh_tokens.c.used_at).where(refresh_tokens.c.token_hash == token_hash)
            )
        ).scalar_one()
        record = RefreshTokenRecord(
            token_hash=row.token_hash,
            session_id=row.session_id,
            issued_at=row.issued_at,
            used_at=used_at,
        )
        return record, session

    async def retire_refresh_tokens(self, session_id: str, at: datetime) -> None:
        """Mark the session's unused refresh tokens used (presenting one later is reuse)."""
        await self._session.execute(
            sa.update(refresh_tokens)
            .where(refresh_tokens.c.session_id == session_id, refresh_tokens.c.used_at.is_(None))
            .values(used_at=at)
        )

    async def end(self, session_id: str, at: datetime, reason: str) -> bool:
        """End a live session; False if it was unknown or had already ended."""
        result = await self._session.execute(
            sa.update(sessions)
            .where(sessions.c.id == session_id, sessions.c.ended_at.is_(None))
            .values(ended_at=at, end_reason=reason)
            .returning(sessions.c.id)
        )
        return result.one_or_none() is not None

    async def end_all_of_user(self, user_id: int, at: datetime, reason: str) -> list[str]:
        """End every live session of a user; the ids of those ended."""
        result = await self._session.execute(
            sa.update(sessions)
            .where(sessions.c.user_id == user_id, sessions.c.ended_at.is_(None))
            .values(ended_at=at, end_reason=reason)
            .returning(sessions.c.id)
        )
        return [row.id for row in result]
