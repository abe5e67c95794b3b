"""The ``service_accounts`` table, inside a unit of work's session."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from cake_auth.db import service_accounts
from cake_auth.domain.service_accounts import ServiceAccount


def _account(row: Any) -> ServiceAccount:
    return ServiceAccount(
        id=row.id,
        client_id=row.client_id,
        secret_hash=row.secret_hash,
        scopes=frozenset(row.scopes),
        generation=row.generation,
        created_at=row.created_at,
        disabled_at=row.disabled_at,
    )


class SqlServiceAccountRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(
        self,
        *,
        client_id: str,
        secret_hash: str,
        scopes: frozenset[str],
        generation: str,
        at: datetime,
    ) -> ServiceAccount | None:
        # ON CONFLICT DO NOTHING: two concurrent creations of one name, one wins, the other
        # is told the name exists (no unique-violation error aborting the transaction).
        row = (
            await self._session.execute(
                insert(service_accounts)
                .values(
                    client_id=client_id,
                    secret_hash=secret_hash,
                    scopes=sorted(scopes),
                    generation=generation,
                    created_at=at,
                    updated_at=at,
                )
                .on_conflict_do_nothing(index_elements=["client_id"])
                .returning(*service_accounts.c)
            )
        ).one_or_none()
        return None if row is None else _account(row)

    async def get(self, client_id: str, *, for_update: bool = False) -> ServiceAccount | None:
        query = sa.select(service_accounts).where(service_accounts.c.client_id == client_id)
        if for_update:
            query = query.with_for_update()
        row = (await self._session.execute(query)).one_or_none()
        return None if row is None else _account(row)

    async def update(
        self,
        account_id: int,
        *,
        secret_hash: str,
        scopes: frozenset[str],
        generation: str,
        disabled_at: datetime | None,
        at: datetime,
    ) -> None:
        await self._session.execute(
            sa.update(service_accounts)
            .where(service_accounts.c.id == account_id)
            .values(
                secret_hash=secret_hash,
                scopes=sorted(scopes),
                generation=generation,
                disabled_at=disabled_at,
                updated_at=at,
            )
        )
