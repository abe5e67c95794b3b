"""Failed-login counting in Redis (``cake:auth:login-failures:<sha256>``), atomic, with a
bounded in-process fallback while Redis is down.

``reserve`` checks and counts in one Lua script: an attempt is counted as a failure
*before* its password is checked, so 40 concurrent guesses cannot all slip through
between a check and a count. A success takes the attempt back (the account's count is
cleared, the IP's decremented); so does an attempt that reaches no verdict (its caller went
away while it waited for the hash queue, or the check failed), so that abandoned logins
under overload do not lock the account out. Keys are hashed so they hold no personal data.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable

import redis.asyncio
from cake_common.logging import get_logger

from cake_auth.adapters.redis_guard import RedisGuard, RedisUnavailableError
from cake_auth.domain.login import DelayPolicy, ThrottleKeys, ThrottleStatus

_log = get_logger(__name__)

# KEYS: counters; ARGV[1] = now (ms); then per key: free failures, base delay (ms), max
# delay (ms), window (s). Refuses (0, wait ms) if any counter must still wait, else counts
# the attempt on every counter and answers (1, the first counter's failures).
_RESERVE = """
local now = tonumber(ARGV[1])
local wait = 0
local first = 0
for i, key in ipairs(KEYS) do
  local at = 2 + (i - 1) * 4
  local free, base, cap = tonumber(ARGV[at]), tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  local failures = tonumber(redis.call('HGET', key, 'n') or '0')
  local last = tonumber(redis.call('HGET', key, 't') or '0')
  if i == 1 then first = failures end
  if failures >= free then
    local delay = math.min(base * 2 ^ math.min(failures - free, 30), cap)
    local remaining = last + delay - now
    if remaining > wait then wait = remaining end
  end
end
if wait > 0 then return {0, math.ceil(wait)} end
for i, key in ipairs(KEYS) do
  local window = tonumber(ARGV[2 + (i - 1) * 4 + 3])
  redis.call('HINCRBY', key, 'n', 1)
  redis.call('HSET', key, 't', now)
  redis.call('EXPIRE', key, window)
end
return {1, first + 1}
"""

_SUCCEEDED = """
redis.call('DEL', KEYS[1])
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 1 then
  if redis.call('HINCRBY', KEYS[2], 'n', -1) <= 0 then redis.call('DEL', KEYS[2]) end
end
return 1
"""


# KEYS: counters; takes one attempt back from each (a key at zero goes).
_RELEASED = """
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 and redis.call('HINCRBY', key, 'n', -1) <= 0 then
    redis.call('DEL', key)
  end
end
return 1
"""


class LocalFailureCounter:
    """The fallback while Redis is down: the same rules in this process's memory, for at
    most ``max_entries`` keys (least recently used forgotten). Per process: with several
    replicas an attacker gets each replica's allowance, still bounded."""

    def __init__(
        self, *, max_entries: int = 10_000, clock: Callable[[], float] = time.time
    ) -> None:
        self._entries: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._max = max_entries
        self._clock = clock

    def reserve(self, counters: list[tuple[str, DelayPolicy]]) -> ThrottleStatus:
        now = self._clock()
        wait, first = 0.0, 0
        for index, (key, policy) in enumerate(counters):
            failures, last = self._entries.get(key, (0, 0.0))
            if failures and now - last > policy.window_seconds:
                failures = 0
            if index == 0:
                first = failures
            wait = max(wait, policy.wait(failures, last, now))
        if wait > 0:
            return ThrottleStatus(failures=first, retry_after_seconds=max(1, math.ceil(wait)))
        for key, policy in counters:
            failures, last = self._entries.pop(key, (0, 0.0))
            if failures and now - last > policy.window_seconds:
                failures = 0
            self._entries[key] = (failures + 1, now)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
        return ThrottleStatus(failures=first + 1)

    def succeeded(self, account_key: str, ip_key: str | None) -> None:
        self._entries.pop(account_key, None)
        if ip_key is not None:
            self.released([ip_key])

    def released(self, keys: list[str]) -> None:
        for key in keys:
            if key in self._entries:
                failures, last = self._entries[key]
                if failures <= 1:
                    del self._entries[key]
                else:
                    self._entries[key] = (failures - 1, last)


class RedisLoginThrottle:
    def __init__(
        self,
        client: redis.asyncio.Redis,
        guard: RedisGuard,
        *,
        account_policy: DelayPolicy,
        ip_policy: DelayPolicy,
        key_prefix: str = "cake:auth:",
        fallback: LocalFailureCounter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key_prefix = f"{key_prefix}login-failures:"
        self._redis = client
        self._guard = guard
        self._account_policy = account_policy
        self._ip_policy = ip_policy
        self._fallback = fallback or LocalFailureCounter()
        self._clock = clock
        self._reserve_script = client.register_script(_RESERVE)
        self._succeeded_script = client.register_script(_SUCCEEDED)
        self._released_script = client.register_script(_RELEASED)

    def _key(self, name: str) -> str:
        return self._key_prefix + hashlib.sha256(name.encode()).hexdigest()

    def _counters(self, keys: ThrottleKeys) -> list[tuple[str, DelayPolicy]]:
        counters = [(self._key(f"account:{keys.account}"), self._account_policy)]
        if keys.client_ip:
            counters.append((self._key(f"ip:{keys.client_ip}"), self._ip_policy))
        return counters

    async def reserve(self, keys: ThrottleKeys) -> ThrottleStatus:
        """Count this attempt as a failure now, or refuse it (not counted) if it must wait."""
        counters = self._counters(keys)
        args: list[float | int] = [int(self._clock() * 1000)]
        for _, policy in counters:
            args += [
                policy.free_failures,
                int(policy.base_delay_seconds * 1000),
                int(policy.max_delay_seconds * 1000),
                policy.window_seconds,
            ]

        async def run() -> object:
            return await self._reserve_script(keys=[key for key, _ in counters], args=args)

        try:
            result = await self._guard.run("login_throttle_reserve", run)
        except RedisUnavailableError:
            return self._fallback.reserve(counters)
        allowed, value = (int(part) for part in result)  # type: ignore[attr-defined]
        if allowed:
            return ThrottleStatus(failures=value)
        return ThrottleStatus(retry_after_seconds=max(1, math.ceil(value / 1000)))

    async def succeeded(self, keys: ThrottleKeys) -> None:
        """The password was right: clear the account's failures, take the attempt back
        from the IP's count."""
        counters = self._counters(keys)
        account_key = counters[0][0]
        ip_key = counters[1][0] if len(counters) > 1 else None
        self._fallback.succeeded(account_key, ip_key)

        async def run() -> object:
            return await self._succeeded_script(keys=[key for key, _ in counters])

        try:
            await self._guard.run("login_throttle_reset", run)
        except RedisUnavailableError:
            _log.debug("login throttle reset skipped; redis unavailable")

    async def released(self, keys: ThrottleKeys) -> None:
        """No verdict reached the caller: take the attempt back from every counter."""
        counter_keys = [key for key, _ in self._counters(keys)]
        self._fallback.released(counter_keys)

        async def run() -> object:
            return await self._released_script(keys=counter_keys)

        try:
            await self._guard.run("login_throttle_release", run)
        except RedisUnavailableError:
            _log.debug("login throttle release skipped; redis unavailable")
