"""Auth service over raw gRPC: login throughput against the machine's bcrypt ceiling, and
profile reads per second with the cache warm. Prints numbers; asserts nothing.

In one run, on one machine:

1. bcrypt ceiling = usable cores ÷ the time of one check alone at the configured cost
   (measured here with the service's hasher), next to what the service's hasher really
   reaches flat out on ``cores`` threads right now (above the ceiling for the lanes hasher,
   which computes several checks per thread at once; below it for the others when the box is
   busy);
2. login throughput: a real ``cake-auth serve`` subprocess, logged into by enough concurrent
   gRPC clients to keep every hashing worker busy; ratio = throughput ÷ ceiling (goal ≥ 0.85);
3. profile reads/s: ``GetProfile`` with a bearer token, the Redis cache warmed first.

The client runs in this process on the same cores as the service; the load average at the
start is printed because other work on the box skews everything.

How to run (from the repo root)::

    # PostgreSQL and Redis of the test-profile stack (started if they are not running);
    # a scratch database is created for the run and dropped afterwards:
    uv run python bench/auth_grpc.py

    # against servers of your own (the database is migrated and users are added to it):
    uv run python bench/auth_grpc.py --database-url postgresql+psycopg://u:p@host/db \\
        --redis-url redis://host:6379/0

    # options: --bcrypt-cost 10 --hasher lanes|bcrypt|libxcrypt --login-seconds 15
    #          --login-concurrency 8 --profile-seconds 10 --profile-concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path
from typing import cast

import bcrypt
import grpc
from cake.auth.v1 import auth_pb2, auth_pb2_grpc
from cake_auth.adapters.password_hashers import (
    HasherKind,
    Libxcrypt,
    available_cpus,
    open_password_hasher,
)
from cake_auth.adapters.signing_keys import JWKS_FILENAME, SIGNING_KEY_FILENAME, generate_key_pair
from cake_bcrypt import BcryptEngine, bcrypt_key, parse_hash
from grpc_health.v1 import health_pb2, health_pb2_grpc

PASSWORD = "bench-password-123"  # noqa: S105  # the benchmark users' password
WARM_UP_SECONDS = 2.0


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    index = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def parallel_bcrypt_rate(
    cost: int, threads: int, seconds: float = 3.0, *, hasher: str = "lanes"
) -> float:
    """Checks per second the auth service's ``hasher`` gives flat out with ``threads``
    hashing threads (every lane of every thread busy for the lanes hasher): what the box
    gives now. Runs its own event loop on a thread of its own (callers may be in one)."""
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=cost)).decode()

    async def flat_out() -> float:
        service_hasher = await open_password_hasher(
            cast(HasherKind, hasher), cost=cost, workers=threads
        )
        stop_at = time.monotonic() + seconds
        done = 0

        async def caller() -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                if not await service_hasher.verify(PASSWORD, hashed):
                    raise SystemExit("a benchmark check did not match: the hasher is broken")
                done += 1

        started = time.monotonic()
        try:
            await asyncio.gather(*(caller() for _ in range(service_hasher.concurrency)))
        finally:
            await service_hasher.close()
        return done / (time.monotonic() - started)

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, flat_out()).result()


def bcrypt_check_seconds(
    cost: int, samples: int = 15, *, hasher: str = "lanes"
) -> tuple[float, float]:
    """Median wall time and CPU time of one bcrypt check alone at ``cost`` by the auth
    service's ``hasher`` (cake_bcrypt's lanes with nothing beside it, libxcrypt's crypt_rn or
    pyca bcrypt; the CPU time hardly moves when other work shares the box; the wall time
    does)."""
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=cost))
    check: Callable[[], object]
    cpu_clock = time.thread_time
    engine: BcryptEngine | None = None
    if hasher == "lanes":
        engine = BcryptEngine(lanes=1)
        setting = parse_hash(hashed.decode())
        key = bcrypt_key(PASSWORD.encode())
        running = engine

        def check() -> object:
            return running.submit(key, setting.salt, setting.cost).result()

        cpu_clock = time.process_time  # the work is on the engine's thread
    elif hasher == "libxcrypt":
        library = Libxcrypt()

        def check() -> object:
            return library.verify(PASSWORD, hashed.decode())
    else:

        def check() -> object:
            return bcrypt.checkpw(PASSWORD.encode(), hashed)

    wall, cpu = [], []
    try:
        for _ in range(samples):
            started, started_cpu = time.perf_counter(), cpu_clock()
            check()
            wall.append(time.perf_counter() - started)
            cpu.append(cpu_clock() - started_cpu)
    finally:
        if engine is not None:
            engine.close()
    return statistics.median(wall), statistics.median(cpu)


# -- infrastructure -------------------------------------------------------------------------


@dataclass(frozen=True)
class Infrastructure:
    database_url: str
    redis_url: str


@contextlib.contextmanager
def test_stack_infrastructure() -> Iterator[Infrastructure]:
    """PostgreSQL and Redis of the test-profile stack, with a scratch database for this run."""
    import psycopg
    from cake_devtools.stack import Stack
    from psycopg import sql

    stack = Stack("test", echo=None)
    stack.up(["postgres", "redis"])
    name = f"bench_auth_{secrets.token_hex(4)}"
    admin_url = stack.postgres_admin_url
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield Infrastructure(database_url=f"{base}/{name}", redis_url=stack.redis_url)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class ServiceProcess:
    address: str
    pid: int

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the service and any live child processes, from
        /proc; 0 where there is no /proc."""
        return sum(_process_cpu_seconds(pid) for pid in (self.pid, *_children(self.pid)))


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            children += [int(child) for child in (task / "children").read_text().split()]
    return children


def _process_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def auth_service(
    infrastructure: Infrastructure, keys: Path, args: argparse.Namespace
) -> Iterator[ServiceProcess]:
    """``cake-auth serve`` as a subprocess (its own interpreter, like in production)."""
    port = _free_port()
    env = {
        **os.environ,
        "CAKE_AUTH_DATABASE_URL": infrastructure.database_url,
        "CAKE_AUTH_REDIS_URL": infrastructure.redis_url,
        "CAKE_AUTH_REDIS_KEY_PREFIX": f"cake:auth:bench-{secrets.token_hex(4)}:",
        "CAKE_AUTH_GRPC_PORT": str(port),
        # One process (this benchmark measures one), whatever .run/dev/auth.env says.
        "CAKE_AUTH_WORKERS": "1",
        "CAKE_AUTH_JWT_PRIVATE_KEY_FILE": str(keys / SIGNING_KEY_FILENAME),
        "CAKE_AUTH_JWKS_FILE": str(keys / JWKS_FILENAME),
        "CAKE_AUTH_BCRYPT_COST": str(args.bcrypt_cost),
        "CAKE_AUTH_PASSWORD_HASHER": args.hasher,
        "CAKE_AUTH_LOG_LEVEL": "WARNING",
        "CAKE_AUTH_DATABASE_POOL_SIZE": "20",
    }
    log = tempfile.NamedTemporaryFile(prefix="bench-auth-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "cake_auth", "serve"], env=env, stdout=log, stderr=log
    )
    try:
        yield ServiceProcess(f"127.0.0.1:{port}", process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        if process.returncode not in (0, -signal.SIGTERM):
            print(f"(service exited with {process.returncode}; its log: {log.name})")
        else:
            Path(log.name).unlink(missing_ok=True)


async def wait_serving(address: str, timeout_seconds: float = 120) -> None:
    deadline = time.monotonic() + timeout_seconds
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                response = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"auth service at {address} did not become SERVING")
            await asyncio.sleep(0.3)


# -- load -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    calls: int
    errors: int
    seconds: float
    latencies: list[float]
    service_cpu_seconds: float
    client_cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    def describe(self) -> str:
        ordered = sorted(self.latencies)
        return (
            f"{self.rate:8.1f}/s  ({self.calls} ok, {self.errors} errors in {self.seconds:.1f} s; "
            f"latency p50 {percentile(ordered, 0.5) * 1000:.1f} ms, "
            f"p95 {percentile(ordered, 0.95) * 1000:.1f} ms, "
            f"p99 {percentile(ordered, 0.99) * 1000:.1f} ms)\n"
            f"{'':21}CPU per call: service {self.service_cpu_seconds / self.calls * 1000:.2f} ms, "
            f"this client {self.client_cpu_seconds / self.calls * 1000:.2f} ms"
        )


async def run_load(
    call: Callable[[int], Awaitable[object]],
    service: ServiceProcess,
    *,
    concurrency: int,
    seconds: float,
) -> LoadResult:
    """``concurrency`` workers calling back to back; only calls after the warm-up count."""
    started = time.monotonic()
    measure_from = started + WARM_UP_SECONDS
    stop_at = measure_from + seconds
    latencies: list[float] = []
    errors = 0
    cpu_at_start: list[float] = []

    async def sample_cpu_after_warm_up() -> None:
        await asyncio.sleep(WARM_UP_SECONDS)
        cpu_at_start.extend((service.cpu_seconds(), _own_cpu_seconds()))

    async def worker(worker_id: int) -> None:
        nonlocal errors
        while (now := time.monotonic()) < stop_at:
            try:
                await call(worker_id)
            except grpc.aio.AioRpcError:
                if now >= measure_from:
                    errors += 1
                continue
            if now >= measure_from:
                latencies.append(time.monotonic() - now)

    await asyncio.gather(
        sample_cpu_after_warm_up(), *(worker(index) for index in range(concurrency))
    )
    return LoadResult(
        len(latencies),
        errors,
        seconds,
        latencies,
        service_cpu_seconds=service.cpu_seconds() - cpu_at_start[0],
        client_cpu_seconds=_own_cpu_seconds() - cpu_at_start[1],
    )


@contextlib.asynccontextmanager
async def stubs(
    address: str, count: int
) -> AsyncIterator[list[auth_pb2_grpc.AuthServiceAsyncStub]]:
    """Several HTTP/2 connections, so one connection's flow control is not the limit."""
    channels = [grpc.aio.insecure_channel(address) for _ in range(count)]
    try:
        yield [auth_pb2_grpc.AuthServiceStub(channel) for channel in channels]
    finally:
        await asyncio.gather(*(channel.close(None) for channel in channels))


async def register_users(
    stub: auth_pb2_grpc.AuthServiceAsyncStub, count: int
) -> list[auth_pb2.RegisterResponse]:
    run = secrets.token_hex(3)

    async def register(index: int) -> auth_pb2.RegisterResponse:
        response: auth_pb2.RegisterResponse = await stub.Register(
            auth_pb2.RegisterRequest(
                fullname=f"Bench User {index}",
                email=f"bench_{run}_{index}@example.com",
                username=f"bench_{run}_{index}",
                phone=f"+99{int(run, 16) % 10**6:06d}{index:05d}",
                password=PASSWORD,
                birthday="1990-01-01",
            )
        )
        return response

    return list(await asyncio.gather(*(register(index) for index in range(count))))


async def benchmark(
    service: ServiceProcess, args: argparse.Namespace, ceiling: float, check_cpu: float
) -> None:
    await wait_serving(service.address)
    async with stubs(service.address, args.channels) as clients:
        users = await register_users(clients[0], args.users)
        accounts = cycle(user.user.username for user in users)

        async def login(worker_id: int) -> object:
            stub = clients[worker_id % len(clients)]
            return await stub.Login(
                auth_pb2.LoginRequest(account=next(accounts), password=PASSWORD)
            )

        logins = await run_load(
            login, service, concurrency=args.login_concurrency, seconds=args.login_seconds
        )
        print(f"login via gRPC:      {logins.describe()}")
        print(f"login ÷ ceiling:     {logins.rate / ceiling:8.2f}   (goal ≥ 0.85)")
        if logins.service_cpu_seconds > 0:
            # Load-independent view of the same question: how much of the service's CPU per
            # login is the bcrypt check itself (1.0 = the service adds nothing).
            share = check_cpu * logins.calls / logins.service_cpu_seconds
            print(f"bcrypt ÷ service CPU:{share:8.2f}   per login")

        bearers = [(("authorization", f"Bearer {user.access_token}"),) for user in users]
        for bearer in bearers:  # warm the profile cache
            await clients[0].GetProfile(auth_pb2.GetProfileRequest(), metadata=bearer)

        async def profile(worker_id: int) -> object:
            stub = clients[worker_id % len(clients)]
            return await stub.GetProfile(
                auth_pb2.GetProfileRequest(), metadata=bearers[worker_id % len(bearers)]
            )

        reads = await run_load(
            profile, service, concurrency=args.profile_concurrency, seconds=args.profile_seconds
        )
        print(f"profile via gRPC:    {reads.describe()}")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="postgresql+psycopg URL (default: test stack)")
    parser.add_argument("--redis-url", help="Redis URL (default: test stack)")
    parser.add_argument("--bcrypt-cost", type=int, default=10)
    parser.add_argument("--hasher", choices=("lanes", "bcrypt", "libxcrypt"), default="lanes")
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--login-seconds", type=float, default=15)
    parser.add_argument("--login-concurrency", type=int, default=4 * available_cpus())
    parser.add_argument("--profile-seconds", type=float, default=10)
    parser.add_argument("--profile-concurrency", type=int, default=64)
    args = parser.parse_args()
    if (args.database_url is None) != (args.redis_url is None):
        parser.error("give both --database-url and --redis-url, or neither (test stack)")
    return args


def main() -> None:
    args = _arguments()
    cores = available_cpus()
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"machine:             {cores} usable cores, load average {load} at start")
    check, check_cpu = bcrypt_check_seconds(args.bcrypt_cost, hasher=args.hasher)
    ceiling = cores / check
    print(
        f"bcrypt ceiling:      {ceiling:8.1f}/s  "
        f"({cores} cores ÷ {check * 1000:.1f} ms per check at cost {args.bcrypt_cost}, "
        f"{check_cpu * 1000:.1f} ms of CPU; service hasher: {args.hasher})"
    )
    parallel = parallel_bcrypt_rate(args.bcrypt_cost, cores, hasher=args.hasher)
    print(
        f"bcrypt, {cores} threads: {parallel:8.1f}/s  (measured flat out; "
        f"÷ ceiling {parallel / ceiling:.2f} shows how much other load takes)"
    )
    with contextlib.ExitStack() as exits:
        if args.database_url is not None:
            infrastructure = Infrastructure(args.database_url, args.redis_url)
        else:
            infrastructure = exits.enter_context(test_stack_infrastructure())
        keys = Path(exits.enter_context(tempfile.TemporaryDirectory(prefix="bench-auth-keys-")))
        generate_key_pair(keys)
        service = exits.enter_context(auth_service(infrastructure, keys, args))
        asyncio.run(benchmark(service, args, ceiling, check_cpu))


if __name__ == "__main__":
    # A clean line instead of a traceback when a pipe (| head) closes early.
    with contextlib.suppress(BrokenPipeError):
        main()
