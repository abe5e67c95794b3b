"""A small REST client of Cake for the real-cluster suite (``tests/cluster``) and its drills.

Only what the suite does through the gateway: register, log in, run a campaign as an admin,
read vouchers, top up; plus :class:`LoadResult`, the figures of a run of many calls.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

import httpx

#: Every test user's password (throw-away accounts on a test cluster).
PASSWORD = "k8s-test-pass"  # noqa: S105


class CakeError(RuntimeError):
    """A call answered something else than the suite expected."""


@dataclass(frozen=True)
class Account:
    user_id: str
    username: str
    password: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class CakeClient:
    """Cake's REST API through one gateway URL (thread-safe: httpx.Client is)."""

    def __init__(self, base_url: str, *, timeout: float = 30) -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        self.http = httpx.Client(base_url=base_url, timeout=timeout, limits=limits)

    def __enter__(self) -> CakeClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.http.close()

    @staticmethod
    def new_phone() -> str:
        return "+849" + str(uuid.uuid4().int)[:8]

    def expect(self, response: httpx.Response, status: int) -> dict[str, Any]:
        if response.status_code != status:
            raise CakeError(
                f"{response.request.method} {response.request.url.path}: expected {status}, "
                f"got {response.status_code} {response.text[:300]}"
            )
        body: dict[str, Any] = response.json() if response.content else {}
        return body

    def register(self, tag: str) -> Account:
        username = f"{tag}_{uuid.uuid4().hex[:10]}"
        body = {
            "fullname": "Cluster Tester",
            "email": f"{username}@example.com",
            "username": username,
            "phone": self.new_phone(),
            "password": PASSWORD,
            "birthday": "1990-04-01",
        }
        answer = self.expect(self.http.post("/auth/register", json=body), 201)
        return Account(str(answer["user"]["id"]), username, PASSWORD, answer["access_token"])

    def login(self, account: str, password: str = PASSWORD) -> dict[str, Any]:
        response = self.http.post("/auth/login", json={"account": account, "password": password})
        return self.expect(response, 200)

    def create_campaign(self, admin: Account, max_participants: int, name: str) -> int:
        now = datetime.now(UTC)
        body = {
            "name": name,
            "description": "created by the real-cluster suite",
            "type": "first_login_discount",
            "startDate": iso(now - timedelta(minutes=1)),
            "endDate": iso(now + timedelta(hours=2)),
            "maxParticipants": max_participants,
            "discountPercentage": 30,
            "minTopupAmount": 50000,
            "maxDiscountAmount": 20000,
            "voucherValidityDays": 30,
        }
        response = self.http.post("/promotions/campaigns", json=body, headers=admin.headers)
        return int(self.expect(response, 201)["id"])

    def end_campaign(self, admin: Account, campaign_id: int, *, wait: float = 60) -> None:
        """Set the campaign inactive; 503 (right after a drill replaced pods) is retried."""
        deadline = time.monotonic() + wait
        while True:
            response = self.http.patch(
                f"/promotions/campaigns/{campaign_id}/status",
                json={"status": "inactive"},
                headers=admin.headers,
            )
            if response.status_code != 503 or time.monotonic() > deadline:
                self.expect(response, 200)
                return
            time.sleep(1)

    def my_vouchers(self, account: Account) -> list[dict[str, Any]]:
        response = self.http.get("/promotions/my-vouchers", headers=account.headers)
        if response.status_code != 200:
            raise CakeError(f"my-vouchers: {response.status_code} {response.text[:300]}")
        vouchers: list[dict[str, Any]] = response.json()
        return vouchers

    def wait_for_voucher(self, account: Account, seconds: float) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while True:
            vouchers = self.my_vouchers(account)
            if vouchers:
                return vouchers[0]
            if time.monotonic() > deadline:
                raise CakeError(f"{account.username} has no voucher after {seconds:.0f} s")
            time.sleep(0.5)


def register_many(client: CakeClient, count: int, tag: str, parallel: int = 8) -> list[Account]:
    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(lambda _: client.register(tag), range(count)))


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1)]


@dataclass
class LoadResult:
    """Calls made, which failed (status or transport error) and how long the good ones took."""

    ok: int = 0
    failed: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, seconds: float, failure: str | None) -> None:
        with self.lock:
            if failure is None:
                self.ok += 1
                self.latencies.append(seconds)
            else:
                self.failed.append(failure)

    def figures(self) -> dict[str, Any]:
        return {
            "requests": self.ok + len(self.failed),
            "failed": len(self.failed),
            "p50_ms": round(percentile(self.latencies, 0.50) * 1000, 1),
            "p99_ms": round(percentile(self.latencies, 0.99) * 1000, 1),
            "first_failures": self.failed[:5],
        }


def timed_login(client: CakeClient, account: Account, result: LoadResult) -> bool:
    """One login; True when it succeeded. Failures are recorded, never raised."""
    started = time.monotonic()
    try:
        response = client.http.post(
            "/auth/login", json={"account": account.username, "password": account.password}
        )
        failure = None if response.status_code == 200 else f"{response.status_code}"
        if failure:
            failure += f" {response.text[:120]}"
    except httpx.HTTPError as error:
        failure = f"{type(error).__name__}: {error}"
    result.add(time.monotonic() - started, failure)
    return failure is None


def steady_logins(
    client: CakeClient,
    accounts: Iterable[Account],
    rate_per_second: float,
    stop: threading.Event,
    result: LoadResult,
    *,
    workers: int = 8,
) -> None:
    """Logins at a constant arrival rate (open model) until ``stop`` is set."""
    pool = list(accounts)
    interval = 1 / rate_per_second
    with ThreadPoolExecutor(workers) as executor:
        next_at = time.monotonic()
        index = 0
        while not stop.is_set():
            account = pool[index % len(pool)]
            executor.submit(timed_login, client, account, result)
            index += 1
            next_at += interval
            stop.wait(max(0.0, next_at - time.monotonic()))


def until_ok(action: Callable[[], bool], deadline: float, pause: float = 0.3) -> int:
    """Repeat ``action`` until it succeeds; the number of failed attempts before that."""
    failures = 0
    while not action():
        failures += 1
        if time.monotonic() > deadline:
            raise CakeError(f"still failing after {failures} attempts")
        time.sleep(pause)
    return failures
