"""Envoy's CPU per request: logins and profile reads at the same arrival rate, and reads at
saturation, measured on a running stack in one run. Prints numbers; asserts nothing.

    uv run --frozen python bench/envoy_cost.py --profile dev [--rate 20] [--seconds 15]

Envoy's CPU per request is not a property of the route alone: on a shared box it depends on
the arrival rate. A request that arrives alone (20/s) finds Envoy's code and data cold in the
caches and wakes an idle worker thread; at saturation (64 keep-alive connections, about a
thousand reads/s) the same request finds them warm and shares each wake-up with others. So a
login figure taken at 20/s and a read figure taken at saturation differ by several times even
where Envoy does the same work for both. This script puts the three side by side, in the same
minutes: logins at ``--rate`` (vegeta, open model), profile reads at the same rate, then
profile reads over ``--saturation-connections`` connections as fast as they are answered.

For each: Envoy's CPU (user + system ticks of its process, ``/proc/<pid>/stat``) divided by
the requests Envoy handled (admin ``http.gateway.downstream_rq_total``: refused logins,
503 with Retry-After from the auth service's admission control, cost Envoy as much as
answered ones) and, next to it, by the answers with status 200 (what a "per login" figure
divides by); Envoy's idle CPU of the same seconds (measured first, nothing offered) taken
out; the new downstream connections (vegeta opens one per request in flight beyond those it
already has, so slow logins open more) and the load average at start and end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from benchlib import Gateway, SeededUser, require_raised_limits
from cake_devtools.stack import Stack
from cake_devtools.stack.process import cpu_ticks
from cake_devtools.stack.settings import load_settings
from loadgen import Target, attack

COUNTERS = ("http.gateway.downstream_rq_total", "http.gateway.downstream_cx_total")


def _load() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def _counters(admin_url: str) -> dict[str, int]:
    counters: dict[str, int] = {}
    for line in httpx.get(f"{admin_url}/stats", timeout=5).text.splitlines():
        name, _, value = line.partition(": ")
        if name in COUNTERS:
            counters[name] = int(value)
    return counters


def _envoy_seconds(pid: int) -> float:
    ticks = cpu_ticks(pid)
    if ticks is None:
        raise SystemExit(f"envoy (pid {pid}) is gone")
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Measured:
    label: str
    envoy_seconds: float
    elapsed: float
    requests: int
    connections: int
    ok: int
    statuses: dict[str, int]
    load: str


def _run(
    label: str,
    targets: list[Target],
    *,
    pid: int,
    admin_url: str,
    rate: float | None,
    workers: int,
    seconds: float,
) -> Measured:
    name = label.replace("/", "-per-")  # vegeta's file names
    with tempfile.TemporaryDirectory(prefix="envoy-cost-") as directory:
        # Warm-up, not measured: connections opened, the upstream pools at their size.
        attack(
            f"{name}-warm-up", targets, Path(directory), duration_s=2, rate=rate, workers=workers
        )
        load_start, counters_before = _load(), _counters(admin_url)
        cpu_before, began = _envoy_seconds(pid), time.monotonic()
        summary = attack(
            name, targets, Path(directory), duration_s=seconds, rate=rate, workers=workers
        )
        cpu_after, elapsed = _envoy_seconds(pid), time.monotonic() - began
        counters_after = _counters(admin_url)
    statuses = {code: count for op in summary["statuses"].values() for code, count in op.items()}
    grown = {key: counters_after[key] - counters_before.get(key, 0) for key in COUNTERS}
    return Measured(
        label,
        cpu_after - cpu_before,
        elapsed,
        grown["http.gateway.downstream_rq_total"],
        grown["http.gateway.downstream_cx_total"],
        statuses.get("200", 0),
        statuses,
        f"{load_start} at start, {_load()} at end",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="dev", choices=["dev", "test"])
    parser.add_argument("--rate", type=float, default=20.0, help="logins/s and reads/s offered")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per load")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--saturation-connections", type=int, default=64, help="0: skip")
    args = parser.parse_args()

    stack = Stack(args.profile, echo=None)
    require_raised_limits(stack, args.profile)
    settings = load_settings(args.profile)
    admin_url = f"http://127.0.0.1:{settings.envoy_admin_port}"
    pid = stack.processes()["envoy"][0]

    async def seed() -> list[SeededUser]:
        async with Gateway(stack.gateway_url) as gateway:
            return await gateway.register_many(args.users, "ec", login_once=True)

    users = asyncio.run(seed())
    time.sleep(2)  # the seeding's first-login events travel on
    idle_start, idle_began = _envoy_seconds(pid), time.monotonic()
    time.sleep(args.idle_seconds)
    idle_per_second = (_envoy_seconds(pid) - idle_start) / (time.monotonic() - idle_began)

    count = max(1, round(args.rate * args.seconds))
    logins = [
        Target.json(
            "login",
            f"{stack.gateway_url}/auth/login",
            {"account": users[i % len(users)].username, "password": users[i % len(users)].password},
        )
        for i in range(count)
    ]
    reads = [
        Target.get("profile", f"{stack.gateway_url}/auth/profile", token=user.token)
        for user in users
    ]
    workers = max(10, round(args.rate / 5))
    runs = [
        _run(
            f"{kind}-{args.rate:g}/s",
            targets,
            pid=pid,
            admin_url=admin_url,
            rate=args.rate,
            workers=workers,
            seconds=args.seconds,
        )
        for kind, targets in (("logins", logins), ("reads", reads))
    ]
    if args.saturation_connections:
        runs.append(
            _run(
                f"reads-{args.saturation_connections}-connections",
                reads,
                pid=pid,
                admin_url=admin_url,
                rate=None,
                workers=args.saturation_connections,
                seconds=args.seconds,
            )
        )

    print(f"\nEnvoy's idle CPU: {idle_per_second * 1000:.2f} ms per second")
    print(
        f"{'load':30} {'req/s':>7} {'ms/request':>11} {'idle out':>9} {'ms/200':>8}"
        f" {'new conns':>10}  statuses; load average"
    )
    for run in runs:
        requests = max(run.requests, 1)
        net = max(0.0, run.envoy_seconds - idle_per_second * run.elapsed)
        print(
            f"{run.label:30} {run.requests / run.elapsed:7.1f}"
            f" {run.envoy_seconds * 1000 / requests:11.3f} {net * 1000 / requests:9.3f}"
            f" {run.envoy_seconds * 1000 / max(run.ok, 1):8.3f} {run.connections:10d}"
            f"  {run.statuses}; {run.load}"
        )


if __name__ == "__main__":
    main()
