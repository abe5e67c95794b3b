"""Server-side sessions and their rotating refresh tokens: the rules, with no I/O.

A session starts at login or registration and ends at logout, logout-all, an admin's
request, the reuse of a refresh token, or its absolute lifetime. Every access token names
its session (claim ``sid``); a refresh token is usable once, and showing a used one again
means two parties hold it, so the whole session ends.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum


class SessionEnd(StrEnum):
    """Why a session ended (stored, and named in the security audit log)."""

    LOGOUT = "logout"
    LOGOUT_ALL = "logout_all"
    ADMIN = "admin"
    REFRESH_REUSE = "refresh_reuse"
    USER_GONE = "user_gone"


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    user_id: int
    created_at: datetime
    expires_at: datetime
    """Absolute end: refreshing never extends it."""
    ended_at: datetime | None = None
    end_reason: str | None = None

    def is_live(self, now: datetime) -> bool:
        return self.ended_at is None and now < self.expires_at


@dataclass(frozen=True, slots=True)
class RefreshTokenRecord:
    token_hash: str
    session_id: str
    issued_at: datetime
    used_at: datetime | None = None

    @property
    def used(self) -> bool:
        return self.used_at is not None


def session_expiry(created_at: datetime, lifetime_seconds: int) -> datetime:
    return created_at + timedelta(seconds=lifetime_seconds)


def access_token_expiry(now: datetime, ttl_seconds: int, session: Session) -> datetime:
    """An access token never outlives its session."""
    return min(now + timedelta(seconds=ttl_seconds), session.expires_at)


def refresh_token_hash(token: str) -> str:
    """What is stored of a refresh token (a leaked table holds no usable token)."""
    return hashlib.sha256(token.encode()).hexdigest()
