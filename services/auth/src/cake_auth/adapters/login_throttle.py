"""Failed-login counting in Redis (``cake:auth:login-failures:<sha256>``), atomic, with a
bounded in-process fallback while Redis is down.

``reserve`` checks both counters and counts in one Lua script: an attempt is counted
against its account as a failure *before* its password is checked, so 40 concurrent guesses
at one account cannot all slip through between a check and a count. A success clears the
account's count; an attempt that reaches no verdict (its caller went away while it waited
for the hash queue, or the check failed) is taken back, so that abandoned logins under
overload do not lock the account out. The client IP's counter only counts failures once
they are known (``failed``): counted up front, every login *in flight* from one busy
address (a NAT gateway, a proxy, a load generator) would pass for a failure, and correct
passwords from it would be delayed once more than its allowance were waiting for the hash
queue. Guesses spread over many accounts from one address can therefore exceed the IP's
allowance by what is in flight at once, which the hash queue's admission bounds. Keys are
hashed so they hold no personal data.
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

# KEYS: counters (the account's first); ARGV[1] = now (ms); then per key: free failures,
# base delay (ms), max delay (ms), window (s). Refuses (0, wait ms) if any counter must still
# wait, else counts the attempt on the account's counter and answers (1, its failures).
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
redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('HSET', KEYS[1], 't', now)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
return {1, first + 1}
"""

# KEYS[1]: a counter; ARGV: now (ms), window (s). Counts one known failure.
_FAILED = """
redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('HSET', KEYS[1], 't', ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""

_SUCCEEDED = """
redis.call('DEL', KEYS[1])
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
        self.failed(*counters[0])
        return ThrottleStatus(failures=first + 1)

    def failed(self, key: str, policy: DelayPolicy) -> None:
        now = self._clock()
        failures, last = self._entries.pop(key, (0, 0.0))
        if failures and now - last > policy.window_seconds:
            failures = 0
        self._entries[key] = (failures + 1, now)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def succeeded(self, account_key: str) -> None:
        self._entries.pop(account_key, None)

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
        self._failed_script = client.register_script(_FAILED)

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
        """The password was right: clear the account's failures."""
        account_key = self._counters(keys)[0][0]
        self._fallback.succeeded(account_key)

        async def run() -> object:
            return await self._succeeded_script(keys=[account_key])

        try:
            await self._guard.run("login_throttle_reset", run)
        except RedisUnavailableError:
            _log.debug("login throttle reset skipped; redis unavailable")

    async def failed(self, keys: ThrottleKeys) -> None:
        """The password was wrong: count the failure against the client's IP too (the
        account's counter counted it at ``reserve``)."""
        counters = self._counters(keys)
        if len(counters) < 2:
            return
        ip_key, policy = counters[1]
        self._fallback.failed(ip_key, policy)

        async def run() -> object:
            return await self._failed_script(
                keys=[ip_key], args=[int(self._clock() * 1000), policy.window_seconds]
            )

        try:
            await self._guard.run("login_throttle_fail", run)
        except RedisUnavailableError:
            _log.debug("login throttle failure count skipped; redis unavailable")

    async def released(self, keys: ThrottleKeys) -> None:
        """No verdict reached the caller: take the attempt back from the account's count."""
        counter_keys = [self._counters(keys)[0][0]]
        self._fallback.released(counter_keys)

        async def run() -> object:
            return await self._released_script(keys=counter_keys)

        try:
            await self._guard.run("login_throttle_release", run)
        except RedisUnavailableError:
            _log.debug("login throttle release skipped; redis unavailable")
