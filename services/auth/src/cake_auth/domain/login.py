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
    """The outcome of reserving a login attempt."""

    failures: int = 0
    """Failures counted for the account, this attempt included."""
    retry_after_seconds: int | None = None
    """Set when the attempt was refused (and not counted): wait this long."""


@dataclass(frozen=True, slots=True)
class DelayPolicy:
    """Growing delays instead of a lock-out: the first ``free_failures`` failures cost
    nothing, then each further attempt must wait ``base * 2**(extra failures)`` seconds
    after the last failure, at most ``max_delay_seconds``. Failures are forgotten
    ``window_seconds`` after the last one; a success clears the account's count."""

    free_failures: int
    base_delay_seconds: float
    max_delay_seconds: float
    window_seconds: int

    def delay_after(self, failures: int) -> float:
        """How long after the last of ``failures`` failures the next attempt must wait."""
        if failures < self.free_failures:
            return 0.0
        exponent = min(failures - self.free_failures, 30)
        return float(min(self.base_delay_seconds * 2**exponent, self.max_delay_seconds))

    def wait(self, failures: int, last_failure_at: float, now: float) -> float:
        """Seconds still to wait before another attempt (0: may try now)."""
        return max(0.0, last_failure_at + self.delay_after(failures) - now)


@dataclass(frozen=True, slots=True)
class ThrottleKeys:
    """What a login attempt is counted against: the account (the user's id when the
    identifier names one, so username, e-mail and phone share one counter) and, when the
    gateway says, the client's IP address."""

    account: str
    client_ip: str = ""


def throttle_keys(
    account: LoginAccount, user_id: int | None, context: LoginContext
) -> ThrottleKeys:
    key = f"user:{user_id}" if user_id is not None else f"name:{account.throttle_key}"
    return ThrottleKeys(account=key, client_ip=context.client_ip)


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
