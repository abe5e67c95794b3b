"""The auth database transaction: users and their outbox events commit together or not at all."""

from __future__ import annotations

from cake.events.v1 import payloads_pb2, registry
from cake_common.audit import AuditingOutboxRecorder
from cake_common.outbox import OutboxUnitOfWork
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncSession

from cake_auth.adapters.service_accounts_repository import SqlServiceAccountRepository
from cake_auth.adapters.sessions_repository import SqlSessionRepository
from cake_auth.adapters.users_repository import SqlUserRepository
from cake_auth.domain.login import FirstLogin


class OutboxEventRecorder(AuditingOutboxRecorder):
    """Writes domain events as outbox rows in the unit of work's transaction."""

    async def first_login(self, event: FirstLogin) -> None:
        login_at = Timestamp()
        login_at.FromDatetime(event.login_at)
        await self._writer.add(
            self._session,
            registry.USER_FIRST_LOGIN,
            aggregate_id=event.user_id,
            payload=payloads_pb2.UserFirstLogin(
                user_id=event.user_id,
                login_at=login_at,
                user_agent=event.user_agent,
                client_ip=event.client_ip,
            ),
            occurred_at=event.login_at,
            # trace_parent left out: the writer stores the current trace's (tracing on).
        )


class SqlAuthUnitOfWork(OutboxUnitOfWork):
    users: SqlUserRepository
    sessions: SqlSessionRepository
    service_accounts: SqlServiceAccountRepository
    events: OutboxEventRecorder

    def bind_repositories(self, session: AsyncSession) -> None:
        self.users = SqlUserRepository(session)
        self.sessions = SqlSessionRepository(session)
        self.service_accounts = SqlServiceAccountRepository(session)
        self.events = OutboxEventRecorder(session, self.outbox_writer)
