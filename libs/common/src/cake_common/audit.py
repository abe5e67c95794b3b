"""The security audit log's entries, as every service writes them.

A service records an entry as a ``SECURITY_AUDIT`` row of its own outbox, in the same
transaction as what it audits when there is one; the events service's relay keeps it,
append-only, in its database (the registry's audit-log events are published nowhere), where
admins read it (``GET /admin/audit-events``, ``EventAdminService.ListAuditEvents``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from cake.events.v1 import payloads_pb2, registry
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from cake_common.outbox import OutboxWriter

# Entry types (stable names: admins filter by them).
LOGIN_FAILED = "LOGIN_FAILED"
LOGIN_THROTTLED = "LOGIN_THROTTLED"
LOGOUT = "LOGOUT"
LOGOUT_ALL = "LOGOUT_ALL"
REFRESH_TOKEN_REUSED = "REFRESH_TOKEN_REUSED"  # noqa: S105 - an entry type
SESSIONS_ENDED_BY_ADMIN = "SESSIONS_ENDED_BY_ADMIN"
CAMPAIGN_CREATED = "CAMPAIGN_CREATED"
CAMPAIGN_STATUS_CHANGED = "CAMPAIGN_STATUS_CHANGED"
DEAD_LETTERS_RETRIED = "DEAD_LETTERS_RETRIED"
EVENT_REPLAYED = "EVENT_REPLAYED"
SERVICE_ACCOUNT_CREATED = "SERVICE_ACCOUNT_CREATED"
SERVICE_ACCOUNT_SECRET_ROTATED = "SERVICE_ACCOUNT_SECRET_ROTATED"  # noqa: S105 - an entry type
SERVICE_ACCOUNT_DISABLED = "SERVICE_ACCOUNT_DISABLED"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    type: str
    occurred_at: datetime
    actor_user_id: int = 0
    subject_user_id: int = 0
    client_ip: str = ""
    details: Mapping[str, str] = field(default_factory=dict)

    def payload(self) -> payloads_pb2.SecurityAudit:
        occurred_at = Timestamp()
        occurred_at.FromDatetime(self.occurred_at)
        return payloads_pb2.SecurityAudit(
            type=self.type,
            actor_user_id=self.actor_user_id,
            subject_user_id=self.subject_user_id,
            client_ip=self.client_ip[:64],
            details={key: str(value) for key, value in self.details.items()},
            occurred_at=occurred_at,
        )


async def record_audit(
    writer: OutboxWriter, executor: AsyncSession | AsyncConnection, entry: AuditEntry
) -> None:
    """Add the entry to the outbox in ``executor``'s transaction (the caller commits)."""
    await writer.add(
        executor,
        registry.SECURITY_AUDIT,
        aggregate_id=entry.subject_user_id or entry.actor_user_id,
        payload=entry.payload(),
        occurred_at=entry.occurred_at,
    )


class AuditingOutboxRecorder:
    """The base of a service's event recorder (``uow.events``): the outbox events of one unit
    of work, written in its session's transaction with its writer; every producer's records
    the security audit (:meth:`security_audit`), the subclass adds its own events."""

    def __init__(self, session: AsyncSession, writer: OutboxWriter) -> None:
        self._session = session
        self._writer = writer

    async def security_audit(self, entry: AuditEntry) -> None:
        await record_audit(self._writer, self._session, entry)
