"""Cake's benchmark scenarios, as vegeta targets (the open- and closed-model HTTP loads) or,
where every client follows its own flow (log in, then poll for a voucher; race a top-up), as
asyncio clients timed here.

- ``mixed_auth_targets``: the Cake System's auth mix at a fixed arrival rate: login
  (account by username / e-mail / phone 40/40/20), register, profile, in ``mix`` shares;
  a fifth of the logins' share are refreshes (Cake's bearer form, each on a session of its
  own opened beforehand, since a refreshed access token is refused afterwards).
- ``profile_targets``: GET /auth/profile with the seeded users' tokens, round robin.
- ``first_login_burst_clients``: every user logs in at the same moment, then polls
  GET /promotions/my-vouchers until a voucher is there (or ``poll_timeout`` passes); a login
  refused as busy (503) is sent again after its Retry-After, as a well-behaved client does.
- ``topup_race``: every voucher spent by ``racers`` clients at once, each with its own
  idempotency key.
"""

from __future__ import annotations

import asyncio
import math
import random
import secrets
import time
from collections.abc import Sequence
from typing import Any

import httpx
from benchlib import Gateway, SeededUser, new_identity
from loadgen import Target, trend

_random = random.Random()  # noqa: S311 - load shapes, not secrets
REFRESH_SHARE_OF_LOGINS = 0.2
BUSY_RETRIES = 20


def _account(user: SeededUser) -> str:
    r = _random.random() * 100
    if r < 40:
        return user.username
    return user.email if r < 80 else user.phone


def mix_counts(
    rate: float, duration_s: float, login_share: float, *, refresh: bool
) -> tuple[int, int]:
    """Targets one run needs (none sent twice: unique registrations, one-use refreshes) and
    how many sessions its refreshes need."""
    total = math.ceil(rate * duration_s * 1.05) + 5
    refreshes = round(total * login_share / 100 * REFRESH_SHARE_OF_LOGINS * 1.2) + 2
    return total, refreshes if refresh else 0


def mixed_auth_targets(
    base_url: str,
    users: Sequence[SeededUser],
    *,
    total: int,
    mix: Sequence[float],
    refresh_tokens: Sequence[str] = (),
) -> list[Target]:
    login_share, register_share, _ = mix
    refreshes = list(refresh_tokens)
    targets: list[Target] = []
    for _ in range(total):
        r = _random.random() * 100
        user = _random.choice(users)
        if r < login_share:
            if refreshes and _random.random() < REFRESH_SHARE_OF_LOGINS:
                targets.append(
                    Target.json("refresh", f"{base_url}/auth/refresh", {}, token=refreshes.pop())
                )
                continue
            body = {"account": _account(user), "password": user.password}
            targets.append(Target.json("login", f"{base_url}/auth/login", body))
        elif r < login_share + register_share:
            targets.append(
                Target.json(
                    "register", f"{base_url}/auth/register", new_identity("mix"), ok_status=201
                )
            )
        else:
            targets.append(Target.get("profile", f"{base_url}/auth/profile", token=user.token))
    return targets


def profile_targets(base_url: str, users: Sequence[SeededUser]) -> list[Target]:
    return [Target.get("profile", f"{base_url}/auth/profile", token=user.token) for user in users]


async def sessions_for_refresh(
    gateway: Gateway, users: Sequence[SeededUser], count: int
) -> list[str]:
    """``count`` access tokens of new sessions (a login each), to be refreshed once each."""
    gate = asyncio.Semaphore(4)

    async def one(index: int) -> str:
        user = users[index % len(users)]
        async with gate:
            return await gateway.login(user.username, user.password)

    return list(await asyncio.gather(*(one(index) for index in range(count))))


async def _post_until_admitted(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], **kwargs: Any
) -> tuple[httpx.Response, float, int]:
    """POST, sending again after Retry-After while the answer is 503: (answer, seconds in
    all, attempts)."""
    started = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        response = await client.post(path, json=body, **kwargs)
        busy = response.status_code == 503 and "retry-after" in response.headers
        if not busy or attempts == BUSY_RETRIES:
            return response, time.monotonic() - started, attempts
        await asyncio.sleep(float(response.headers["retry-after"]) * (0.5 + _random.random()))


async def first_login_burst_clients(
    base_url: str, users: Sequence[SeededUser], *, poll_ms: float, poll_timeout: float
) -> dict[str, Any]:
    logins: list[float] = []
    lags: list[float] = []
    failed = seen = missing = several = retried = 0
    limits = httpx.Limits(max_connections=len(users) + 10)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        start = asyncio.Event()

        async def one(user: SeededUser) -> None:
            nonlocal failed, seen, missing, several, retried
            await start.wait()
            body = {"account": user.username, "password": user.password}
            response, seconds, attempts = await _post_until_admitted(client, "/auth/login", body)
            logins.append(seconds * 1000)
            retried += attempts > 1
            if response.status_code != 200:
                failed += 1
                return
            headers = {"authorization": f"Bearer {response.json()['access_token']}"}
            logged_in_at = time.monotonic()
            while time.monotonic() - logged_in_at < poll_timeout:
                poll = await client.get("/promotions/my-vouchers", headers=headers)
                vouchers = poll.json() if poll.status_code == 200 else []
                if isinstance(vouchers, list) and vouchers:
                    lags.append((time.monotonic() - logged_in_at) * 1000)
                    seen += 1
                    several += len(vouchers) > 1
                    return
                await asyncio.sleep(poll_ms / 1000)
            missing += 1

        tasks = [asyncio.create_task(one(user)) for user in users]
        await asyncio.sleep(0.1)
        start.set()
        await asyncio.gather(*tasks)
    return {
        "metrics": {
            "op_login_ms": {"values": trend(logins)},
            "op_login_failed": {"values": {"rate": failed / len(users) if users else 0.0}},
            "login_to_voucher_ms": {"values": trend(lags)},
            "vouchers_seen": {"values": {"count": seen}},
            "vouchers_missing": {"values": {"count": missing}},
            "users_with_several_vouchers": {"values": {"count": several}},
            "logins_sent_again_after_503": {"values": {"count": retried}},
        }
    }


async def topup_race(
    base_url: str, holders: Sequence[dict[str, str]], *, racers: int
) -> dict[str, Any]:
    latencies: list[float] = []
    ok_per_voucher: dict[str, int] = {}
    rejected = errors = 0
    limits = httpx.Limits(max_connections=len(holders) * racers + 10)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        start = asyncio.Event()

        async def one(holder: dict[str, str]) -> None:
            nonlocal rejected, errors
            await start.wait()
            body = {
                "phoneNumber": holder["phone"],
                "amount": 100000,
                "voucherCode": holder["voucher"],
            }
            headers = {
                "authorization": f"Bearer {holder['token']}",
                "idempotency-key": f"bench-{secrets.token_hex(8)}",
            }
            started = time.monotonic()
            response = await client.post("/promotions/topup", json=body, headers=headers)
            latencies.append((time.monotonic() - started) * 1000)
            if response.status_code == 200:
                ok_per_voucher[holder["voucher"]] = ok_per_voucher.get(holder["voucher"], 0) + 1
            elif response.status_code in (400, 409):
                rejected += 1
            else:
                errors += 1

        tasks = [asyncio.create_task(one(h)) for h in holders for _ in range(racers)]
        await asyncio.sleep(0.1)
        start.set()
        await asyncio.gather(*tasks)
    return {
        "metrics": {
            "op_topup_ms": {"values": trend(latencies)},
            "topup_ok": {"values": {"count": sum(ok_per_voucher.values())}},
            "topup_rejected": {"values": {"count": rejected}},
            "topup_errors": {"values": {"count": errors}},
        },
        "at_most_one_ok_per_voucher": max(ok_per_voucher.values(), default=0) <= 1,
    }
