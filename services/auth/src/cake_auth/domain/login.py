"""What a login attempt names and what a first login records, with no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from cake_auth.domain.users import normalise_phone

# Only digits, `+`, spaces and dashes: the account could be a phone number.
_PHONE_LIKE = re.compile(r"\+?[0-9][0-9 -]*")


@dataclass(frozen=True, slots=True)
class LoginAccount:
    """The ``account`` of a login (username, e-mail or phone) in its comparable forms."""

    lowered: str
    """Compared with ``lower(username)`` and ``lower(email)``."""
    phone: str
    """Compared with the stored (normalised) phone number."""

    @property
    def can_exist(self) -> bool:
        # No stored username, e-mail or phone contains NUL (and PostgreSQL could not
        # even compare with it), so such an account is simply unknown.
        return "\x00" not in self.lowered

    @property
    def throttle_key(self) -> str:
        """One key per account however it is spelled (case, phone separators)."""
        return self.phone if _PHONE_LIKE.fullmatch(self.lowered) else self.lowered


def login_account(account: str) -> LoginAccount:
    stripped = account.strip()
    return LoginAccount(lowered=stripped.lower(), phone=normalise_phone(stripped))


@dataclass(frozen=True, slots=True)
class ThrottleStatus:
    """An account's recent failed logins, as the throttle store knows them."""

    failures: int = 0
    retry_after_seconds: int | None = None
    """Set when the account may not try again yet."""


@dataclass(frozen=True, slots=True)
class LoginContext:
    """Where a login came from, as forwarded by the gateway (empty when unknown)."""

    user_agent: str = ""
    client_ip: str = ""


@dataclass(frozen=True, slots=True)
class FirstLogin:
    """Domain event: a user logged in for the first time (``USER_FIRST_LOGIN``)."""

    user_id: int
    login_at: datetime
    user_agent: str
    client_ip: str
