"""Cake access tokens: what they claim, with no I/O (signing is an adapter's job)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cake_auth.domain.users import Role


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A signed token and the facts about it that logout needs."""

    token: str
    jti: str
    expires_at: datetime


def access_token_claims(
    *,
    user_id: int,
    role: Role | str,
    issuer: str,
    audience: str,
    issued_at: datetime,
    ttl_seconds: int,
    jti: str,
) -> dict[str, Any]:
    """The JWT claims every Cake service expects: ``sub, role, iss, aud, iat, exp, jti``."""
    expires_at = issued_at + timedelta(seconds=ttl_seconds)
    return {
        "sub": str(user_id),
        "role": str(role),
        "iss": issuer,
        "aud": audience,
        "iat": int(issued_at.timestamp()),
        "exp": int(expires_at.timestamp()),
        "jti": jti,
    }
