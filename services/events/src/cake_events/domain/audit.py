"""Security audit log entries as the events service keeps and pages them (no I/O)."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from uuid import UUID

from cake.events.v1 import payloads_pb2, registry
from google.protobuf.message import DecodeError

from cake_events.domain.delivery import InvalidPageTokenError
from cake_events.domain.relay import OutboxEvent


@dataclass(frozen=True, slots=True)
class StoredAuditEntry:
    event_id: UUID
    source: str
    type: str
    actor_user_id: int
    subject_user_id: int
    client_ip: str
    details: dict[str, str]
    occurred_at: datetime


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Entries of ``type`` (empty: all), where ``user_id`` acted or was concerned (0: all),
    in ``[since, until)`` (``None``: open)."""

    type: str = ""
    user_id: int = 0
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class AuditCursor:
    """Keyset position in the newest-first log: the last entry returned."""

    occurred_at: datetime
    event_id: UUID

    def token(self) -> str:
        document = {"o": self.occurred_at.isoformat(), "e": str(self.event_id)}
        return base64.urlsafe_b64encode(json.dumps(document).encode()).decode().rstrip("=")

    @classmethod
    def from_token(cls, token: str) -> AuditCursor:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            document = json.loads(raw)
            occurred_at = datetime.fromisoformat(document["o"])
            event_id = UUID(document["e"])
        except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise InvalidPageTokenError("page_token is not a token from a previous page") from None
        if occurred_at.tzinfo is None:
            raise InvalidPageTokenError("page_token is not a token from a previous page")
        return cls(occurred_at=occurred_at, event_id=event_id)


@dataclass(frozen=True, slots=True)
class AuditPage:
    entries: list[StoredAuditEntry] = field(default_factory=list)
    next_page_token: str = ""


SECURITY_AUDIT = registry.SECURITY_AUDIT.name


def security_audit_entries(source: str, events: Sequence[OutboxEvent]) -> list[StoredAuditEntry]:
    """The audit entries among relayed events (others cost one string comparison each)."""
    entries = []
    for event in events:
        if event.event_type != SECURITY_AUDIT:
            continue
        try:
            payload = payloads_pb2.SecurityAudit.FromString(event.payload)
        except DecodeError:
            continue  # unreadable payloads are the relay's poison rows, not audit entries
        entries.append(
            StoredAuditEntry(
                event_id=UUID(event.event_id),
                source=source,
                type=payload.type,
                actor_user_id=payload.actor_user_id,
                subject_user_id=payload.subject_user_id,
                client_ip=payload.client_ip,
                details=dict(payload.details),
                occurred_at=(
                    payload.occurred_at.ToDatetime(tzinfo=UTC)
                    if payload.HasField("occurred_at")
                    else event.occurred_at
                ),
            )
        )
    return entries
