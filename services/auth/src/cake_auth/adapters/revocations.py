"""Writes to the shared revocation list (:mod:`cake_common.revocation`) that every service
checks on every call."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from datetime import datetime

from cake_common.errors import Unavailable
from cake_common.revocation import RevocationList, RevocationUnavailable

from cake_auth.metrics import AuthMetrics


class SharedRevocations:
    """A session mark lives as long as the longest access token of the session can
    (``access_ttl_seconds`` plus the verifiers' clock-skew leeway): the session is ended in
    the database too, so no later token exists."""

    def __init__(
        self,
        revocations: RevocationList,
        metrics: AuthMetrics,
        *,
        access_ttl_seconds: int,
        leeway_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._list = revocations
        self._metrics = metrics
        self._leeway = math.ceil(leeway_seconds)
        self._session_ttl = access_ttl_seconds + self._leeway
        self._clock = clock

    async def revoke_sessions(self, session_ids: Sequence[str]) -> None:
        try:
            await self._list.revoke_sessions(session_ids, ttl_seconds=self._session_ttl)
        except RevocationUnavailable:
            self._metrics.redis_bypassed.labels("revoke_sessions").inc()
            # Answering OK would tell the user a token is revoked while it still works.
            raise Unavailable(
                "Logout is temporarily unavailable, please try again",
                reason="TOKEN_REVOCATION_UNAVAILABLE",
            ) from None

    async def revoke_token(self, jti: str, expires_at: datetime) -> None:
        remaining = math.ceil(expires_at.timestamp() - self._clock()) + self._leeway
        try:
            await self._list.revoke_token(jti, ttl_seconds=remaining)
        except RevocationUnavailable:
            self._metrics.redis_bypassed.labels("revoke_token").inc()
            raise Unavailable(
                "Token rotation is temporarily unavailable, please try again",
                reason="TOKEN_REVOCATION_UNAVAILABLE",
            ) from None
