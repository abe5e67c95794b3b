"""Where the auth service's CPU goes, per login and per profile read, measured in-process.

    uv run --frozen python bench/login_profile.py [--logins 400] [--reads 2000] [--cprofile]
    uv run --frozen python bench/login_profile.py --stack dev [--rate 20] [--seconds 40]

The auth server runs in THIS process (one worker, as each worker of ``cake-auth serve``
runs), on a scratch database of the test-profile stack's PostgreSQL and its Redis (started
if they are not running); the gRPC client runs in a separate process, so the CPU counted here
(``time.process_time()``: every thread of the server process, the hashing threads included)
is the server's alone. It prints, per login: the server CPU, the CPU of one password check
(median of single checks by the service's hasher at the same cost) and the rest (CPU per
login minus the check: gRPC, validation, the two transactions, Redis, token signing,
logging); and the server CPU per profile read (cache warm). With ``--cprofile`` it repeats
the logins under cProfile (event-loop thread only: the hash runs in other threads) and
prints that thread's time by library and its top functions. cProfile slows Python code down
by a factor, so read its shares, not its absolute figures. Other load on the box skews
wall-clock figures and, less, CPU figures: the load average is printed at start and end.

With ``--stack PROFILE`` it measures a running stack instead (``cake-stack up``, the gateway
with raised limits: ``CAKE_GATEWAY_PROFILE=bench``): it seeds ``--users`` users through the
gateway (each logged in once, so the measured logins are repeat logins), measures every
stack process's CPU (``/proc/<pid>/stat``) with nothing offered for ``--idle-seconds``, then
while vegeta offers logins at ``--rate`` per second for ``--seconds``, and prints the CPU per
login of each process group (auth's supervisor and workers, Envoy, PostgreSQL's backends by
role and database, Redis, Kafka, the relay, promotions' consumer...) with the idle CPU of the
same seconds taken out: where a login's non-hash CPU goes, process by process.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import math
import multiprocessing
import os
import pstats
import secrets
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import grpc
from auth_grpc import PASSWORD, bcrypt_check_seconds, test_stack_infrastructure
from cake.auth.v1 import auth_pb2, auth_pb2_grpc
from cake_auth.adapters.signing_keys import JWKS_FILENAME, SIGNING_KEY_FILENAME, generate_key_pair
from cake_auth.bootstrap import start_server
from cake_auth.settings import AuthSettings
from cake_common.service_runtime import start_logging


def _load() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


# -- the client (its own process) -----------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """``count`` calls of one kind by ``concurrency`` concurrent clients."""

    address: str
    kind: str
    count: int
    concurrency: int
    accounts: tuple[str, ...]
    token: str


async def _calls(load: Load) -> float:
    channels = [grpc.aio.insecure_channel(load.address) for _ in range(4)]
    stubs = [auth_pb2_grpc.AuthServiceStub(channel) for channel in channels]
    remaining = load.count
    bearer = (("authorization", f"Bearer {load.token}"),)

    async def worker(index: int) -> None:
        nonlocal remaining
        stub = stubs[index % len(stubs)]
        while remaining > 0:
            remaining -= 1
            if load.kind == "login":
                account = load.accounts[remaining % len(load.accounts)]
                await stub.Login(auth_pb2.LoginRequest(account=account, password=PASSWORD))
            else:
                await stub.GetProfile(auth_pb2.GetProfileRequest(), metadata=bearer)

    started = time.perf_counter()
    await asyncio.gather(*(worker(index) for index in range(load.concurrency)))
    elapsed = time.perf_counter() - started
    await asyncio.gather(*(channel.close(None) for channel in channels))
    return elapsed


def _client(load: Load) -> float:
    return asyncio.run(_calls(load))


async def _measured(load: Load) -> tuple[float, float, float]:
    """(server CPU seconds, the event-loop thread's CPU seconds, wall seconds) of ``load``,
    sent from a spawned process while the server keeps serving on this event loop."""
    context = multiprocessing.get_context("spawn")
    cpu_before, loop_before = time.process_time(), time.thread_time()
    with context.Pool(1) as pool:
        wall = float(await asyncio.to_thread(pool.apply, _client, (load,)))
    return time.process_time() - cpu_before, time.thread_time() - loop_before, wall


_LIBRARIES = (
    ("grpc", ("/grpc/", "grpc_", "cygrpc")),
    ("protobuf", ("/google/protobuf/", "upb")),
    ("validation", ("protovalidate", "celpy", "/cel", "cake_common/validation")),
    ("sqlalchemy", ("/sqlalchemy/",)),
    ("psycopg", ("/psycopg",)),
    ("redis", ("/redis/",)),
    ("token signing", ("/jwt/", "/cryptography/", "signing_keys")),
    ("logging", ("/structlog/", "/logging/", "cake_common/logging")),
    ("prometheus", ("/prometheus_client/",)),
    ("asyncio", ("/asyncio/",)),
    ("cake", ("cake_",)),
)


def _library(filename: str) -> str:
    for name, markers in _LIBRARIES:
        if any(marker in filename for marker in markers):
            return name
    return "other"


def _print_profile(profile: cProfile.Profile, logins: int) -> None:
    stats = pstats.Stats(profile)
    entries = stats.stats  # type: ignore[attr-defined]
    by_library: dict[str, float] = defaultdict(float)
    total = 0.0
    for (filename, _line, _name), (
        _calls,
        _primitive,
        own,
        _cumulative,
        _callers,
    ) in entries.items():
        by_library[_library(filename)] += own
        total += own
    print(f"\nevent-loop thread under cProfile: {total / logins * 1000:.2f} ms per login")
    for name, seconds in sorted(by_library.items(), key=lambda item: -item[1]):
        print(f"  {name:<14} {seconds / total * 100:5.1f} %")
    print("\nCake's own steps, CPU including what they call (ms per call of the measured RPC):")
    steps = [
        (cumulative, f"{Path(filename).parent.name}/{Path(filename).name}:{name}")
        for (filename, _line, name), (_c, _p, _own, cumulative, _callers) in entries.items()
        if "/cake_" in filename and "call_scope" not in filename
    ]
    for cumulative, where in sorted(steps, reverse=True)[:22]:
        print(f"  {cumulative / logins * 1000:7.3f}  {where}")
    print("\ntop functions by own time:")
    stats.sort_stats("tottime").print_stats(30)


def _print_figures(
    args: argparse.Namespace,
    check_cpu: float,
    logins: tuple[float, float, float],
    reads: tuple[float, float, float],
) -> None:
    login_cpu, login_loop_cpu, login_wall = logins
    read_cpu, _, read_wall = reads
    per_login = login_cpu / args.logins
    print(f"\nlogins: {args.logins} by {args.concurrency} concurrent clients")
    print(f"  server CPU per login     {per_login * 1000:7.2f} ms")
    print(f"  of which the hash check  {check_cpu * 1000:7.2f} ms (cost {args.bcrypt_cost})")
    print(f"  the rest                 {(per_login - check_cpu) * 1000:7.2f} ms")
    print(f"  of which the event loop  {login_loop_cpu / args.logins * 1000:7.2f} ms")
    print(f"  throughput               {args.logins / login_wall:7.1f} /s (wall)")
    print(f"profile reads: {args.reads} by {args.read_concurrency} concurrent clients")
    print(f"  server CPU per read      {read_cpu / args.reads * 1000:7.2f} ms")
    print(f"  throughput               {args.reads / read_wall:7.1f} /s (wall)")


async def _run(
    args: argparse.Namespace, database_url: str, redis_url: str, log_sink: TextIO
) -> None:
    keys = Path(tempfile.mkdtemp(prefix="bench-login-keys-"))
    generate_key_pair(keys)
    settings = AuthSettings(
        database_url=database_url,
        redis_url=redis_url,
        redis_key_prefix=f"cake:auth:bench-{secrets.token_hex(4)}:",
        grpc_port=0,
        workers=1,
        jwt_private_key_file=keys / SIGNING_KEY_FILENAME,
        jwks_file=keys / JWKS_FILENAME,
        bcrypt_cost=args.bcrypt_cost,
        # Logins are counted per client IP too; the bench is one client.
        login_ip_max_failures=10**6,
        # A closed loop of --concurrency clients: what is measured is CPU per login, not the
        # admission (on a busy box its measured queue would refuse some of them).
        hash_queue_max_waiting=10**6,
    )
    start_logging(settings)
    # Logged as in production (JSON, INFO), into nothing: the cost is the formatting.
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(log_sink)
    running = await start_server(settings)
    address = f"127.0.0.1:{running.port}"
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            run = secrets.token_hex(3)
            accounts: list[str] = []
            for index in range(args.users):
                username = f"prof_{run}_{index}"
                await stub.Register(
                    auth_pb2.RegisterRequest(
                        fullname=f"Profile User {index}",
                        email=f"{username}@example.com",
                        username=username,
                        phone=f"+98{int(run, 16) % 10**6:06d}{index:04d}",
                        password=PASSWORD,
                        birthday="1990-01-01",
                    )
                )
                accounts.append(username)
                # The first login (its outbox event) is not what is measured.
                await stub.Login(auth_pb2.LoginRequest(account=username, password=PASSWORD))
            login = await stub.Login(auth_pb2.LoginRequest(account=accounts[0], password=PASSWORD))
            token = login.access_token

        def load(kind: str, count: int) -> Load:
            concurrency = args.concurrency if kind == "login" else args.read_concurrency
            return Load(address, kind, count, concurrency, tuple(accounts), token)

        # Warm-up (connections, caches), then the measured runs.
        await _measured(load("login", 40))
        await _measured(load("profile", 200))
        _, check_cpu = bcrypt_check_seconds(args.bcrypt_cost, hasher=settings.password_hasher)
        logins = await _measured(load("login", args.logins))
        reads = await _measured(load("profile", args.reads))
        _print_figures(args, check_cpu, logins, reads)

        if args.cprofile:
            profile = cProfile.Profile(time.thread_time)
            profile.enable()
            await _measured(load("login", args.logins))
            profile.disable()
            _print_profile(profile, args.logins)
            profile = cProfile.Profile(time.thread_time)
            profile.enable()
            await _measured(load("profile", args.reads))
            profile.disable()
            print("\n-- profile reads --")
            _print_profile(profile, args.reads)
    finally:
        await running.stop()


# -- a running stack, process by process (--stack) -------------------------------------------


def _process_label(component: str, pid: int) -> str:
    """A name for one stack process that stays the same across samples: PostgreSQL's
    backends by role and database (its own processes by their title), auth's workers."""
    try:
        words = [
            word
            for word in Path(f"/proc/{pid}/cmdline")
            .read_bytes()
            .decode(errors="replace")
            .split("\0")
            if word
        ]
    except OSError:
        return f"{component} (gone)"
    title = " ".join(words)
    if component == "postgres" and title.startswith("postgres: "):
        parts = title.removeprefix("postgres: ").split()
        if len(parts) >= 3 and "(" in parts[2]:
            return f"postgres backend {parts[0]}@{parts[1]}"
        return "postgres " + " ".join(part for part in parts if part.isalpha())
    if any("multiprocessing-fork" in word for word in words):
        return f"{component} worker"
    if words and Path(words[0]).name == "uv":
        return f"{component} (uv wrapper)"
    return component


@dataclass(frozen=True)
class _Ticks:
    at: float
    ticks: dict[int, tuple[str, int]]


def _stack_ticks(stack: Any) -> _Ticks:
    from cake_devtools.stack.process import cpu_ticks

    ticks: dict[int, tuple[str, int]] = {}
    for component, pids in stack.processes().items():
        for pid in pids:
            used = cpu_ticks(pid)
            if used is not None:
                ticks[pid] = (_process_label(component, pid), used)
    return _Ticks(time.monotonic(), ticks)


def _seconds_by_label(before: _Ticks, after: _Ticks) -> dict[str, float]:
    per_second = os.sysconf("SC_CLK_TCK")
    seconds: dict[str, float] = defaultdict(float)
    for pid, (label, used) in after.ticks.items():
        earlier = before.ticks.get(pid, (label, 0))[1]
        seconds[label] += (used - earlier) / per_second
    return seconds


def _stack_mode(args: argparse.Namespace) -> None:
    from benchlib import Gateway, require_raised_limits
    from cake_devtools.stack import Stack
    from loadgen import attack
    from scenarios import mixed_auth_targets

    stack = Stack(args.stack, echo=None)
    require_raised_limits(stack, args.stack)
    directory = Path(tempfile.mkdtemp(prefix="bench-login-stack-"))

    async def seed() -> list[Any]:
        async with Gateway(stack.gateway_url) as gateway:
            return await gateway.register_many(args.users, "lp", login_once=True)

    users = asyncio.run(seed())
    time.sleep(args.idle_seconds / 2)  # the seeding's first-login events travel on
    idle_before = _stack_ticks(stack)
    time.sleep(args.idle_seconds)
    idle_after = _stack_ticks(stack)
    idle = _seconds_by_label(idle_before, idle_after)
    idle_span = idle_after.at - idle_before.at
    workers = max(10, math.ceil(args.rate / 5))
    # Warm-up, not measured: the pools grow to what the rate needs (a new PostgreSQL
    # backend costs milliseconds of CPU).
    warm_up = round(args.rate * 5)
    attack(
        "login-warm-up",
        mixed_auth_targets(stack.gateway_url, users, total=warm_up, mix=(100, 0, 0)),
        directory,
        duration_s=5,
        rate=args.rate,
        workers=workers,
    )
    total = round(args.rate * args.seconds)
    targets = mixed_auth_targets(stack.gateway_url, users, total=total, mix=(100, 0, 0))
    load_start = _load()
    before = _stack_ticks(stack)
    summary = attack(
        "login-cpu",
        targets,
        directory,
        duration_s=args.seconds,
        rate=args.rate,
        workers=workers,
    )
    after = _stack_ticks(stack)
    span = after.at - before.at
    busy = _seconds_by_label(before, after)
    ok = int(summary.get("metrics", {}).get("op_login_ok_ms", {}).get("values", {}).get("count", 0))
    sent = int(summary.get("metrics", {}).get("op_login_ms", {}).get("values", {}).get("count", 0))
    print(
        f"\nlogins at {args.rate:g}/s for {args.seconds:g} s through {stack.gateway_url}: "
        f"{ok} answered 200 of {sent}; load average {load_start} at start, {_load()} at end"
    )
    if not ok:
        raise SystemExit("no login succeeded: nothing to divide by")
    print(f"{'process group':44} {'ms/login':>9} {'idle out':>9} {'idle cores':>11}")
    rows = []
    for label in sorted(set(busy) | set(idle)):
        used = busy.get(label, 0.0)
        idle_cores = idle.get(label, 0.0) / idle_span if idle_span else 0.0
        net = max(0.0, used - idle_cores * span)
        rows.append((net, label, used, idle_cores))
    for net, label, used, idle_cores in sorted(rows, reverse=True):
        if used * 1000 / ok >= 0.005:
            print(f"{label:44} {used * 1000 / ok:9.2f} {net * 1000 / ok:9.2f} {idle_cores:11.3f}")
    all_used = sum(row[2] for row in rows)
    all_net = sum(row[0] for row in rows)
    print(f"{'all':44} {all_used * 1000 / ok:9.2f} {all_net * 1000 / ok:9.2f}")
    auth = stack.service_environment()["auth"]
    cost = int(auth.get("CAKE_AUTH_BCRYPT_COST", "10"))
    hasher = auth.get(
        "CAKE_AUTH_PASSWORD_HASHER", AuthSettings.model_fields["password_hasher"].default
    )
    _, check = bcrypt_check_seconds(cost, hasher=hasher)
    print(
        f"one {hasher} check at cost {cost}: {check * 1000:.2f} ms of CPU; besides it, per login:"
        f" {(all_net - check * ok) * 1000 / ok:.2f} ms (idle out)"
        f" (refusals and failures are not divided out: keep --rate under the hash ceiling)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logins", type=int, default=400)
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--read-concurrency", type=int, default=16)
    parser.add_argument("--bcrypt-cost", type=int, default=10)
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--stack", help="measure this running stack's processes (dev, test)")
    parser.add_argument("--rate", type=float, default=20.0, help="--stack: logins/s")
    parser.add_argument("--seconds", type=float, default=40.0, help="--stack: seconds of load")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="--stack: idle baseline")
    args = parser.parse_args()
    if args.stack:
        print(f"load average at start: {_load()}")
        _stack_mode(args)
        return
    print(f"load average at start: {_load()} (the box may be shared: compare runs made together)")
    started = time.monotonic()
    with test_stack_infrastructure() as infrastructure, open(os.devnull, "w") as log_sink:
        asyncio.run(_run(args, infrastructure.database_url, infrastructure.redis_url, log_sink))
    print(f"\nload average at end: {_load()} ({time.monotonic() - started:.0f} s)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
