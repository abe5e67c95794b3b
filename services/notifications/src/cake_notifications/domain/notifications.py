"""What a notification is and which channels it goes out on: pure rules, no I/O."""

from __future__ import annotations

import base64
import binascii
import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from uuid import UUID

from cake_common.errors import FieldViolation, InvalidArgument, NotFound


class Kind(enum.StrEnum):
    """The kind of event a notification tells about (the API shows the event type's
    registry name, entrypoints/grpc/servicer.py)."""

    VOUCHER_ISSUED = "voucher_issued"
    VOUCHER_USED = "voucher_used"
    PAYMENT_PROCESSED = "payment_processed"


class Channel(enum.StrEnum):
    """A way out besides the in-app list."""

    EMAIL = "email"
    SMS = "sms"
    PUSH = "push"


class Language(enum.StrEnum):
    VI = "vi"
    EN = "en"


DEFAULT_LANGUAGE = Language.VI
"""Cake's users are in Vietnam: Vietnamese unless the user or the account says otherwise."""

CHANNELS_BY_KIND: Mapping[Kind, tuple[Channel, ...]] = {
    Kind.VOUCHER_ISSUED: (Channel.EMAIL, Channel.SMS, Channel.PUSH),
    # The receipt of the same top-up (PAYMENT_PROCESSED) is the e-mail and the SMS; a spent
    # voucher only gets a push message and its in-app entry, so one top-up is one e-mail.
    Kind.VOUCHER_USED: (Channel.PUSH,),
    Kind.PAYMENT_PROCESSED: (Channel.EMAIL, Channel.SMS, Channel.PUSH),
}


def parse_language(value: str | None) -> Language | None:
    """A supported language from a tag such as ``en``, ``en-US`` or ``vi_VN``; None if not."""
    if not value:
        return None
    primary = value.replace("_", "-").split("-", 1)[0].strip().lower()
    try:
        return Language(primary)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Preferences:
    """A user's choices (every channel on until they say otherwise)."""

    user_id: int
    email: bool = True
    sms: bool = True
    push: bool = True
    language: Language | None = None
    """None: the account's language, else :data:`DEFAULT_LANGUAGE`."""

    def allows(self, channel: Channel) -> bool:
        return {Channel.EMAIL: self.email, Channel.SMS: self.sms, Channel.PUSH: self.push}[channel]

    def language_or(self, fallback: Language | None) -> Language:
        return self.language or fallback or DEFAULT_LANGUAGE

    def changed(
        self,
        *,
        email: bool | None = None,
        sms: bool | None = None,
        push: bool | None = None,
        language: str | None = None,
    ) -> Preferences:
        """These preferences with the given fields changed (None: unchanged)."""
        new_language = self.language
        if language is not None:
            new_language = parse_language(language)
            if new_language is None or new_language.value != language:
                message = "language must be one of: vi, en"
                raise InvalidArgument(
                    message, [FieldViolation("language", message)], reason="INVALID_LANGUAGE"
                )
        return Preferences(
            user_id=self.user_id,
            email=self.email if email is None else email,
            sms=self.sms if sms is None else sms,
            push=self.push if push is None else push,
            language=new_language,
        )


def channels_for(kind: Kind, preferences: Preferences) -> tuple[Channel, ...]:
    """The channels an event of ``kind`` goes out on for a user with ``preferences``."""
    return tuple(c for c in CHANNELS_BY_KIND[kind] if preferences.allows(c))


def too_old_to_notify(occurred_at: datetime, now: datetime, max_age: timedelta) -> bool:
    """Whether an event is too old to tell the user about (a new consumer group replaying a
    topic's history must not e-mail anyone about a months-old voucher). An event from the
    future (clock skew) is not too old."""
    return now - occurred_at > max_age


@dataclass(frozen=True, slots=True)
class EventFacts:
    """What an event says, as the templates see it (strings, numbers, datetimes)."""

    event_id: UUID
    user_id: int
    kind: Kind
    occurred_at: datetime
    values: Mapping[str, str] = field(default_factory=dict)
    """Template variables (voucher code, amounts...); exact decimals stay strings."""


@dataclass(frozen=True, slots=True)
class Notification:
    """One entry of a user's in-app list."""

    id: UUID
    user_id: int
    event_id: UUID
    kind: Kind
    title: str
    body: str
    created_at: datetime
    channels: tuple[Channel, ...]
    read_at: datetime | None = None

    @property
    def read(self) -> bool:
        return self.read_at is not None


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    """Waiting for its first or next attempt."""
    SENT = "sent"
    FAILED = "failed"
    """Refused for good (an address the server rejects); never retried."""
    SKIPPED = "skipped"
    """Nowhere to send it: the user has no contact on this channel (no phone, no push
    token) or auth does not know them. A normal outcome, not an error; never retried."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """A notification on its way out on one channel (claimed by a dispatcher)."""

    id: UUID
    notification_id: UUID
    user_id: int
    channel: Channel
    kind: Kind
    attempts: int
    facts: Mapping[str, str]
    occurred_at: datetime
    trace_parent: str | None = None


class NotificationNotFound(NotFound):
    def __init__(self) -> None:
        super().__init__("Notification not found", reason="NOTIFICATION_NOT_FOUND")


# -- pages -----------------------------------------------------------------------------------

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100


@dataclass(frozen=True, slots=True)
class PageCursor:
    """Where the next page starts: after the entry (created_at, id), newest first."""

    created_at: datetime
    id: UUID

    def token(self) -> str:
        raw = json.dumps({"t": self.created_at.isoformat(), "i": str(self.id)})
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def parse(cls, token: str) -> PageCursor:
        """The cursor in a page token; ``InvalidArgument`` if it is not one of ours."""
        try:
            padded = token + "=" * (-len(token) % 4)
            data = json.loads(base64.urlsafe_b64decode(padded.encode()))
            created_at = datetime.fromisoformat(data["t"])
            if created_at.tzinfo is None:
                raise ValueError("naive")
            return cls(created_at, UUID(data["i"]))
        except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
            message = "page_token is not a token from a previous page"
            raise InvalidArgument(
                message, [FieldViolation("page_token", message)], reason="INVALID_PAGE_TOKEN"
            ) from None


def page_size(requested: int) -> int:
    return DEFAULT_PAGE_SIZE if requested <= 0 else min(requested, MAX_PAGE_SIZE)


@dataclass(frozen=True, slots=True)
class Page:
    notifications: list[Notification]
    next_page_token: str
    unread_count: int
