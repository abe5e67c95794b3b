"""Cake access tokens: what they claim, with no I/O (signing is an adapter's job)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cake_common.jwt import SERVICE_ROLE

from cake_auth.domain.users import Role


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A signed token and the facts about it that logout needs."""

    token: str
    jti: str
    expires_at: datetime
    session_id: str = ""
    issued_at: datetime | None = None

    @property
    def lifetime_seconds(self) -> int:
        """``expires_in`` of the token endpoint answers."""
        if self.issued_at is None:
            return 0
        return max(0, int((self.expires_at - self.issued_at).total_seconds()))


def access_token_claims(
    *,
    user_id: int,
    role: Role | str,
    issuer: str,
    audience: str,
    issued_at: datetime,
    ttl_seconds: int,
    jti: str,
    session_id: str,
    not_after: datetime | None = None,
) -> dict[str, Any]:
    """The JWT claims every Cake service expects: ``sub, role, iss, aud, iat, exp, jti, sid``.

    ``exp`` is ``ttl_seconds`` after ``issued_at`` but never after ``not_after``.
    """
    expires_at = issued_at + timedelta(seconds=ttl_seconds)
    if not_after is not None:
        expires_at = min(expires_at, not_after)
    return {
        "sub": str(user_id),
        "role": str(role),
        "iss": issuer,
        "aud": audience,
        "iat": int(issued_at.timestamp()),
        "exp": int(expires_at.timestamp()),
        "jti": jti,
        "sid": session_id,
    }


def service_token_claims(
    *,
    client_id: str,
    scopes: Sequence[str],
    issuer: str,
    audience: str,
    issued_at: datetime,
    ttl_seconds: int,
    jti: str,
    session_id: str,
) -> dict[str, Any]:
    """A service account's token: role ``service``, ``sub`` the client id, ``client_id``
    too (RFC 8693 section 4.3) and the granted scopes space-separated in ``scope``."""
    return {
        "sub": client_id,
        "client_id": client_id,
        "role": SERVICE_ROLE,
        "scope": " ".join(scopes),
        "iss": issuer,
        "aud": audience,
        "iat": int(issued_at.timestamp()),
        "exp": int((issued_at + timedelta(seconds=ttl_seconds)).timestamp()),
        "jti": jti,
        "sid": session_id,
    }
