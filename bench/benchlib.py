"""Shared helpers of the benchmark runner, its seeding and the fault drills.

Everything here talks to a running local stack (``cake_devtools.stack.Stack``) through its
public gateway, except the read-only database counts that check correctness (vouchers per
user, top-ups per voucher), which need the services' own databases.
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from cake_common.db import create_async_engine_for
from cake_devtools.stack import Stack
from sqlalchemy.ext.asyncio import AsyncEngine

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
PASSWORD = "bench-pass-123"  # noqa: S105 - throwaway benchmark users
ADMIN_USERNAME = "bench_admin"
BUSY_RETRIES = 20
ADMIN_PASSWORD = "bench-admin-pass-1"  # noqa: S105 - local stacks only


def say(message: str) -> None:
    """Progress line (flushed, so it interleaves correctly with other processes' output)."""
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (0.0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(fraction * len(ordered)) - 1))
    return ordered[index]


@dataclass(frozen=True)
class SeededUser:
    user_id: int | str  # str: a peer system's non-numeric ids (side-by-side mode)
    username: str
    email: str
    phone: str
    password: str
    token: str


# Phone numbers have 7 free digits (+8491xxxxxxx, the Cake System's format): drawn at random,
# a run of a few thousand registrations collided with itself about one run in four (a 409
# counted as an error). One block of consecutive numbers per process instead, from a random
# start: a run never collides with itself, and with an earlier run only if their blocks
# overlap.
_PHONE_SPACE = 10_000_000
_phone_numbers = itertools.count(secrets.randbelow(_PHONE_SPACE))


def new_identity(tag: str) -> dict[str, str]:
    """A registration body that collides neither with this run's other users nor, but for
    a very small chance, with another run's."""
    suffix = secrets.token_hex(5)
    digits = str(next(_phone_numbers) % _PHONE_SPACE).zfill(7)
    username = f"b{tag}_{suffix}"
    return {
        "fullname": f"Bench {tag}",
        "email": f"{username}@bench.example.com",
        "username": username,
        "phone": f"+8491{digits}",
        "password": PASSWORD,
        "birthday": "1995-06-01",
    }


class Gateway:
    """A small REST client of the gateway (one connection pool, JSON in and out)."""

    def __init__(self, base_url: str, *, concurrency: int = 16, timeout: float = 30.0) -> None:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.client = httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits)

    async def __aenter__(self) -> Gateway:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.client.aclose()

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        all_headers = dict(headers or {})
        if token:
            all_headers["authorization"] = f"Bearer {token}"
        for _ in range(BUSY_RETRIES):
            response = await self.client.request(
                method, path, json=body if body is not None else None, headers=all_headers
            )
            # The auth service refuses logins/registrations beyond its hash queue (503 with
            # Retry-After): seeding waits as told, like any well-behaved client.
            if response.status_code != 503 or "retry-after" not in response.headers:
                break
            await asyncio.sleep(float(response.headers["retry-after"]))
        return response

    async def register(self, identity: dict[str, str]) -> SeededUser:
        response = await self.call("POST", "/auth/register", body=identity)
        if response.status_code != 201:
            raise RuntimeError(f"register failed: {response.status_code} {response.text[:200]}")
        data = response.json()
        return SeededUser(
            user_id=int(raw_id) if str(raw_id := data["user"]["id"]).isdigit() else raw_id,
            username=identity["username"],
            email=identity["email"],
            phone=identity["phone"],
            password=identity["password"],
            token=data["access_token"],
        )

    async def login(self, account: str, password: str) -> str:
        response = await self.call(
            "POST", "/auth/login", body={"account": account, "password": password}
        )
        if response.status_code != 200:
            raise RuntimeError(f"login failed: {response.status_code} {response.text[:200]}")
        token: str = response.json()["access_token"]
        return token

    async def register_many(
        self, count: int, tag: str, *, login_once: bool, parallel: int = 8
    ) -> list[SeededUser]:
        """Register ``count`` users (and log each in once when ``login_once``)."""
        gate = asyncio.Semaphore(parallel)

        async def one() -> SeededUser:
            async with gate:
                user = await self.register(new_identity(tag))
                if not login_once:
                    return user
                token = await self.login(user.username, user.password)
                return SeededUser(**{**asdict(user), "token": token})

        return list(await asyncio.gather(*(one() for _ in range(count))))

    async def create_campaign(self, admin_token: str, max_participants: int, name: str) -> int:
        now = datetime.now(UTC)
        body = {
            "name": name,
            "type": "first_login_discount",
            "startDate": (now - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "endDate": (now + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "maxParticipants": max_participants,
            "discountPercentage": 30,
            "minTopupAmount": 50000,
            "maxDiscountAmount": 20000,
            "voucherValidityDays": 30,
        }
        response = await self.call("POST", "/promotions/campaigns", token=admin_token, body=body)
        if response.status_code != 201:
            raise RuntimeError(f"create campaign: {response.status_code} {response.text[:300]}")
        return int(response.json()["id"])

    async def end_campaign(self, admin_token: str, campaign_id: int) -> None:
        await self.call(
            "PATCH",
            f"/promotions/campaigns/{campaign_id}/status",
            token=admin_token,
            body={"status": "inactive"},
        )


def admin_token_via_cli(stack: Stack, gateway_url: str) -> str:
    """Create (or promote) the benchmark admin with ``cake-auth create-admin``, log it in."""
    environment = {**os.environ, **stack.service_environment()["auth"]}
    cli = Path(sys.executable).with_name("cake-auth")
    command = [
        str(cli),
        "create-admin",
        "--username",
        ADMIN_USERNAME,
        "--email",
        f"{ADMIN_USERNAME}@bench.example.com",
        "--phone",
        "+84900000999",
        "--password",
        ADMIN_PASSWORD,
    ]
    subprocess.run(command, env=environment, check=False, capture_output=True, text=True)
    response = httpx.post(
        f"{gateway_url}/auth/login",
        json={"account": ADMIN_USERNAME, "password": ADMIN_PASSWORD},
        timeout=30,
    )
    if response.status_code != 200:
        raise RuntimeError(f"admin login failed: {response.status_code} {response.text[:200]}")
    token: str = response.json()["access_token"]
    return token


def service_database(stack: Stack, service: str) -> AsyncEngine:
    """Async engine on a service's own database (read-only use: correctness counts)."""
    url = stack.service_environment()[service][f"CAKE_{service.upper()}_DATABASE_URL"]
    return create_async_engine_for(url, pool_size=2)


async def voucher_counts(promotions: AsyncEngine, campaign_id: int) -> tuple[int, int]:
    """(vouchers, distinct users holding one) of a campaign."""
    async with promotions.connect() as connection:
        row = (
            await connection.execute(
                sa.text(
                    "SELECT count(v.id), count(DISTINCT v.user_id) FROM vouchers v"
                    " JOIN user_promotions up ON up.id = v.user_promotion_id"
                    " WHERE up.campaign_id = :campaign"
                ),
                {"campaign": campaign_id},
            )
        ).one()
    return int(row[0]), int(row[1])


def check_stack(stack: Stack) -> None:
    """Fail early, with the fix, when the stack or its gateway is not answering."""
    url = stack.gateway_url
    try:
        response = httpx.get(f"{url}/health", timeout=5)
    except httpx.HTTPError as error:
        raise SystemExit(
            f"the {stack.profile} stack's gateway ({url}) does not answer ({error}); start it with"
            f" `uv run cake-stack up --profile {stack.profile}`"
            + (
                " (CAKE_GATEWAY_PROFILE=bench for raised rate limits)"
                if stack.profile == "dev"
                else ""
            )
        ) from error
    say(
        f"stack '{stack.profile}' up: GET {url}/health -> {response.status_code}"
        f" {response.text[:80]}"
    )


def rate_limits_raised(stack: Stack) -> bool:
    """Whether the running gateway config carries the ``bench`` rate-limit preset."""
    config = stack.run_dir / "envoy" / "envoy.yaml"
    return config.exists() and "max_tokens: 10000000" in config.read_text()


def require_raised_limits(stack: Stack, profile: str) -> None:
    """Stop with the fix spelled out when the gateway runs the default per-IP limits: the load,
    the seeding and the drills all come from this one address, so at 100 requests/min every
    figure would be a 429."""
    if rate_limits_raised(stack):
        return
    variable = "CAKE_GATEWAY_PROFILE" if profile == "dev" else "CAKE_TEST_GATEWAY_PROFILE"
    raise SystemExit(
        "the gateway runs the default rate limits (100/min per IP); restart it with raised"
        f" ones first: {variable}=bench uv run cake-stack restart envoy --profile {profile}"
    )


def metric(summary: dict[str, Any], name: str) -> dict[str, float]:
    """The values of one metric in a scenario's summary ({} when absent)."""
    values: dict[str, float] = summary.get("metrics", {}).get(name, {}).get("values", {})
    return values


def write_users(path: Path, users: Sequence[SeededUser], **extra: Any) -> None:
    path.write_text(json.dumps({"users": [asdict(user) for user in users], **extra}))


def latency_over_time(samples_csv: Path, metric_name: str) -> list[dict[str, float]]:
    """Per-second count and P50/P95/P99 of one operation's latency, from the samples CSV
    (``loadgen.write_samples``)."""
    buckets: dict[int, list[float]] = {}
    with samples_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["metric_name"] == metric_name:
                buckets.setdefault(int(float(row["timestamp"])), []).append(
                    float(row["metric_value"])
                )
    if not buckets:
        return []
    first = min(buckets)
    return [
        {
            "second": second - first,
            "count": len(values),
            "p50": percentile(values, 0.50),
            "p95": percentile(values, 0.95),
            "p99": percentile(values, 0.99),
        }
        for second, values in sorted(buckets.items())
    ]


# -- CPU of the server processes ----------------------------------------------------------------


@dataclass(frozen=True)
class CpuSample:
    """CPU time so far of every process of every running component (``/proc/<pid>/stat``:
    user + system, in clock ticks), and the 1-minute load average, at one moment."""

    load_average: float
    ticks: dict[str, dict[int, int]]
    at: float = field(default_factory=time.monotonic)
    """When it was taken (``time.monotonic``), to turn CPU time into cores."""


def sample_server_cpu(stack: Stack) -> CpuSample:
    from cake_devtools.stack.process import cpu_ticks

    ticks: dict[str, dict[int, int]] = {}
    for component, pids in stack.processes().items():
        sampled = {pid: cpu_ticks(pid) for pid in pids}
        ticks[component] = {pid: used for pid, used in sampled.items() if used is not None}
    return CpuSample(os.getloadavg()[0], ticks)


def server_cpu(
    before: CpuSample, after: CpuSample, requests: float, **figures: float
) -> dict[str, Any]:
    """CPU per request of each component between two samples: what a request costs the
    servers whatever drives them (the load generator's own CPU is not in it). A process
    started in between counts from zero (all its CPU is in the interval); one that ended in
    between is missed (the stack's servers live for the whole run; short-lived PostgreSQL
    backends are the exception). ``figures`` (throughput, p99, ...) are kept alongside."""
    per_second = os.sysconf("SC_CLK_TCK")
    components: dict[str, dict[str, float]] = {}
    for name, now in after.ticks.items():
        earlier = before.ticks.get(name, {})
        seconds = sum(used - earlier.get(pid, 0) for pid, used in now.items()) / per_second
        components[name] = {
            "cpu_seconds": seconds,
            "per_request_ms": seconds * 1000 / requests if requests else 0.0,
            "processes": len(now),
        }
    total = sum(c["cpu_seconds"] for c in components.values())
    return {
        "requests": requests,
        "per_request_ms": total * 1000 / requests if requests else 0.0,
        "seconds": after.at - before.at,
        "cpu_seconds": total,
        "load_average": {"start": before.load_average, "end": after.load_average},
        "components": components,
        **figures,
    }


def cores_used(before: CpuSample, after: CpuSample) -> float:
    """CPU the sampled processes used between two samples, in cores (1.0: one core busy)."""
    if after.at <= before.at:
        return 0.0
    seconds: float = server_cpu(before, after, 0)["cpu_seconds"]
    return seconds / (after.at - before.at)


# -- the processes of a server the stack did not start (a peer system) ----------------------
# Found by the TCP ports they listen on and by pid files, then with every descendant (a
# PostgreSQL's backends, a supervisor's workers), again at each sample since backends come
# and go. Hand-written over /proc (as cake_devtools.stack.process does for the stack's own
# processes) rather than a new dependency (psutil) for these few lines; Linux only, like
# the rest of the benchmark's CPU accounting.

_TCP_LISTEN = "0A"


def _parent_and_state(pid: int) -> tuple[int, str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the name (field 2) may hold spaces
    return int(fields[1]), fields[0]


def _live_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def with_descendants(roots: Iterable[int]) -> list[int]:
    """``roots`` that are alive and every live process below them."""
    parents: dict[int, int] = {}
    for pid in _live_pids():
        known = _parent_and_state(pid)
        if known is not None and known[1] != "Z":
            parents[pid] = known[0]
    members = {pid for pid in roots if pid in parents}
    grown = True
    while grown:
        children = {pid for pid, parent in parents.items() if parent in members}
        grown = not children <= members
        members |= children
    return sorted(members)


def listening_pids(ports: Iterable[int]) -> dict[int, list[int]]:
    """The processes holding a listening TCP socket on each of ``ports`` (IPv4 or IPv6)."""
    wanted = set(ports)
    inodes: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            port = int(fields[1].rsplit(":", 1)[1], 16)
            if fields[3] == _TCP_LISTEN and port in wanted:
                inodes[f"socket:[{fields[9]}]"] = port
    found: dict[int, set[int]] = {port: set() for port in wanted}
    for pid in _live_pids():
        try:
            descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                link = os.readlink(descriptor)
            except OSError:
                continue
            if link in inodes:
                found[inodes[link]].add(pid)
    return {port: sorted(pids) for port, pids in found.items()}


def process_comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() or "?"
    except OSError:
        return "?"


@dataclass(frozen=True)
class ServerProcesses:
    """Root processes of a system's servers by component; each sample adds descendants."""

    roots: dict[str, tuple[int, ...]]

    def members(self) -> dict[str, list[int]]:
        return {name: with_descendants(pids) for name, pids in self.roots.items()}

    def sample(self) -> CpuSample:
        from cake_devtools.stack.process import cpu_ticks

        ticks: dict[str, dict[int, int]] = {}
        for component, pids in self.members().items():
            sampled = {pid: cpu_ticks(pid) for pid in pids}
            ticks[component] = {pid: used for pid, used in sampled.items() if used is not None}
        return CpuSample(os.getloadavg()[0], ticks)

    def describe(self) -> str:
        members = self.members()
        return ", ".join(
            f"{name} {'/'.join(map(str, self.roots[name]))} ({len(members[name])} processes)"
            for name in self.roots
        )


def _pid_file(path: Path) -> int | None:
    try:
        first = path.read_text().split()
    except OSError:
        return None
    return int(first[0]) if first and first[0].isdigit() else None


def _env_ports(env_file: Path) -> list[int]:
    """The ports a peer's ``.env`` names (``*_PORT=`` values and ``redis://host:port``)."""
    ports: list[int] = []
    try:
        lines = env_file.read_text().splitlines()
    except OSError:
        return ports
    for line in lines:
        name, _, value = line.partition("=")
        value = value.strip()
        if name.strip().endswith("_PORT") and value.isdigit():
            ports.append(int(value))
        elif "://" in value and value.rsplit(":", 1)[-1].split("/")[0].isdigit():
            ports.append(int(value.rsplit(":", 1)[-1].split("/")[0]))
    return ports


def find_server_processes(
    ports: Iterable[int], pid_files: Iterable[Path] = (), pids: Iterable[int] = ()
) -> ServerProcesses:
    """The processes listening on ``ports``, those named by ``pid_files`` and ``pids``,
    grouped by their command name (``node``, ``postgres``, ``redis-server``, ...); a root
    that is a descendant of another root is counted with it, once."""
    candidates = {pid for listeners in listening_pids(ports).values() for pid in listeners}
    candidates |= {pid for pid in map(_pid_file, pid_files) if pid is not None}
    candidates |= set(pids)
    candidates = {pid for pid in candidates if _parent_and_state(pid) is not None}
    covered = {child for pid in candidates for child in with_descendants([pid]) if child != pid}
    roots: dict[str, list[int]] = {}
    for pid in sorted(candidates - covered):
        roots.setdefault(process_comm(pid), []).append(pid)
    return ServerProcesses({name: tuple(pids) for name, pids in roots.items()})


def find_peer_processes(
    peer_url: str,
    peer_dir: Path | None,
    extra_ports: Iterable[int] = (),
    extra_pids: Iterable[int] = (),
) -> ServerProcesses:
    """A peer system's server processes: what listens on its URL's port, on ``extra_ports``
    and on the ports its ``peer_dir`` names (``app/.env``: its PostgreSQL and Redis), the
    pid files there (``app.pid``, ``redis.pid``, ``pg/data/postmaster.pid``; the layout of
    the peer script's work folder), and ``extra_pids``."""
    ports = {httpx.URL(peer_url).port or 80, *extra_ports}
    pid_files: list[Path] = []
    if peer_dir is not None:
        ports |= set(_env_ports(peer_dir / "app" / ".env"))
        pid_files = [
            peer_dir / "app.pid",
            peer_dir / "redis.pid",
            peer_dir / "pg" / "data" / "postmaster.pid",
        ]
    return find_server_processes(sorted(ports), pid_files, extra_pids)


def statuses_total(summary: dict[str, Any]) -> int:
    """Every request a vegeta scenario sent (all operations, all outcomes)."""
    return sum(sum(codes.values()) for codes in summary["statuses"].values())
