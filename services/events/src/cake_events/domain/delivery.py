"""What the events service records about delivery: publications, dead letters, statistics."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from uuid import UUID


@dataclass(frozen=True, slots=True)
class PublishedBatch:
    """Audit-log lines for the events of one relay batch that Kafka acknowledged.

    Column by column (one list per field, all the same length, one entry per event):
    the relay writes hundreds of lines per batch, and a line object per event cost more
    than the INSERT itself.
    """

    source: str
    event_ids: list[str]
    event_types: list[str]
    aggregate_ids: list[str]
    topics: list[str]
    partitions: list[int]
    offsets: list[int]

    def __len__(self) -> int:
        return len(self.event_ids)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event the relay gave up on after its last allowed attempt."""

    event_id: UUID
    source: str
    event_type: str
    aggregate_type: str
    aggregate_id: str
    topic: str | None
    attempts: int
    last_error: str
    payload: bytes
    payload_type: str
    occurred_at: datetime
    failed_at: datetime | None = None
    """Set by the database when the dead letter is recorded."""


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Cake's queue statistics for one source (or several, added up).

    ``waiting``: unpublished, not dead-lettered rows (including those waiting for a retry)
    that are not being published right now; ``active``: rows this replica is publishing at
    this moment; ``completed``: publications in the audit log (an event sent again after a
    crash or a replay counts again, as a re-run job does in Cake's queues); ``failed``:
    parked dead letters.
    """

    waiting: int = 0
    active: int = 0
    completed: int = 0
    failed: int = 0

    def __add__(self, other: QueueStats) -> QueueStats:
        return QueueStats(
            waiting=self.waiting + other.waiting,
            active=self.active + other.active,
            completed=self.completed + other.completed,
            failed=self.failed + other.failed,
        )


@dataclass(frozen=True, slots=True)
class SourceQueueStats:
    """The statistics of one outbox source (a producing service), with the topics its
    events go to."""

    source: str
    topics: tuple[str, ...]
    stats: QueueStats


def total(stats: Iterable[QueueStats]) -> QueueStats:
    """The sum of ``stats`` (zeros for none)."""
    return sum(stats, QueueStats())


class ReplayStatus(StrEnum):
    """Delivery state of an event after an admin asked to replay it."""

    PENDING = "pending"
    """Back in its outbox, to be published by the relay."""


class InvalidPageTokenError(ValueError):
    """A page token this service did not issue (or that was altered)."""


@dataclass(frozen=True, slots=True)
class DeadLetterCursor:
    """Keyset position in the newest-first list of dead letters: the last one returned."""

    failed_at: datetime
    event_id: UUID

    def token(self) -> str:
        document = {"f": self.failed_at.isoformat(), "e": str(self.event_id)}
        return base64.urlsafe_b64encode(json.dumps(document).encode()).decode().rstrip("=")

    @classmethod
    def from_token(cls, token: str) -> DeadLetterCursor:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            document = json.loads(raw)
            failed_at = datetime.fromisoformat(document["f"])
            event_id = UUID(document["e"])
        except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise InvalidPageTokenError("page_token is not a token from a previous page") from None
        if failed_at.tzinfo is None:
            raise InvalidPageTokenError("page_token is not a token from a previous page")
        return cls(failed_at=failed_at, event_id=event_id)
