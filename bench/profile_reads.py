"""Profile reads per second through the gateway next to the same reads over direct gRPC to the
auth service, measured in one run on one machine. Prints numbers; asserts nothing.

Three workloads of ``GetProfile`` with the same bearer token and concurrency, alternated in
short slices (so that other load on the machine hits them alike) after a warm-up:

1. REST through Envoy (``GET /auth/profile``: transcoding, edge JWT check, Lua, rate limit);
2. native gRPC through Envoy (same listener, same JWT check, no transcoding);
3. native gRPC straight to the auth service.

A fourth workload, a health check straight to the auth service, is the floor: what any
unary call costs a grpc.aio server of Cake with its interceptors, before any work of its own.
For each workload the server CPU per call is printed too, by component (user + system time of
every process of every stack component, ``/proc/<pid>/stat``, summed over the measured
slices only; the Python client's own CPU is not in it): where a read's CPU goes.

Ratio goal (issue 6): REST through the gateway ÷ direct gRPC ≥ 0.7. The REST client is a
minimal keep-alive HTTP/1.1 client on asyncio streams, so the Python client costs about as
much per call as the gRPC one; client, Envoy and services share the machine's cores, and the
load average at the start is printed because other work on the box skews everything.

``--vegeta`` measures the gateway the way ``make bench`` does instead: vegeta (the benchmarks'
Go load generator) sends ``GET /auth/profile`` over ``--concurrency`` keep-alive connections,
as fast as they are answered (``--rate 0``, saturation) or at a constant arrival rate, with
the tokens of ``--users`` seeded users in turn. It prints reads/s, P50/P95/P99, the server CPU
per read of every component *and of every auth process* (a worker that does most of the work
shows here), vegeta's own CPU per read (the load generator shares the cores), how Envoy spread
the reads over auth's workers (its admin ``/clusters``: answered requests per endpoint), how
its worker threads shared the connections and whether requests waited for an upstream
connection or stream (admin ``/stats``), and the cores everything used together: what keeps
a saturation run from using every core.

Run against a running stack whose gateway does not throttle (the test profile does not; for
the dev profile start it with ``CAKE_GATEWAY_PROFILE=bench``)::

    uv run python bench/profile_reads.py                  # test stack
    uv run python bench/profile_reads.py --profile dev --seconds 15 --concurrency 64
    uv run python bench/profile_reads.py --profile dev --vegeta --seconds 20 --concurrency 64
    uv run python bench/profile_reads.py --profile dev --vegeta --seconds 20 --rate 1500
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import resource
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import httpx
from benchlib import CpuSample, Gateway, sample_server_cpu
from cake.auth.v1 import auth_pb2, auth_pb2_grpc
from cake_devtools.stack import Stack
from cake_devtools.stack.process import cpu_ticks
from cake_devtools.stack.settings import load_settings
from grpc_health.v1 import health_pb2, health_pb2_grpc
from loadgen import attack
from scenarios import profile_targets

WARM_UP_SECONDS = 2.0


Call = Callable[[], Awaitable[None]]


class Workload:
    """``concurrency`` loops of one kind of call, each loop with its own ``make_call()``."""

    def __init__(
        self,
        name: str,
        make_call: Callable[[], Call],
        concurrency: int,
        sample_cpu: Callable[[], CpuSample] | None = None,
    ) -> None:
        self.name = name
        self.calls = [make_call() for _ in range(concurrency)]
        self.done = 0
        self.elapsed = 0.0
        self._sample_cpu = sample_cpu
        #: Server CPU seconds by component over the measured slices.
        self.cpu_seconds: dict[str, float] = {}

    async def run_for(self, seconds: float, *, count: bool = True) -> None:
        before = self._sample_cpu() if count and self._sample_cpu else None
        began = time.monotonic()
        until = began + seconds
        finished = 0

        async def loop(call: Call) -> None:
            nonlocal finished
            while time.monotonic() < until:
                await call()
                finished += 1

        await asyncio.gather(*(loop(call) for call in self.calls))
        if count:
            self.done += finished
            self.elapsed += time.monotonic() - began
        if before is not None and self._sample_cpu is not None:
            self._add_cpu(before, self._sample_cpu())

    def _add_cpu(self, before: CpuSample, after: CpuSample) -> None:
        per_second = os.sysconf("SC_CLK_TCK")
        for component, now in after.ticks.items():
            earlier = before.ticks.get(component, {})
            used = sum(ticks - earlier.get(pid, 0) for pid, ticks in now.items()) / per_second
            self.cpu_seconds[component] = self.cpu_seconds.get(component, 0.0) + used

    @property
    def rate(self) -> float:
        return self.done / self.elapsed

    def cpu_line(self) -> str:
        """Server CPU per call, in all and by component (largest first, the idle ones left out)."""
        if not self.cpu_seconds or not self.done:
            return ""
        per_call = {name: used * 1000 / self.done for name, used in self.cpu_seconds.items()}
        parts = ", ".join(
            f"{name} {ms:.3f}"
            for name, ms in sorted(per_call.items(), key=lambda item: -item[1])
            if ms >= 0.005
        )
        return f"    server CPU {sum(per_call.values()):.3f} ms/call: {parts}"


async def compare(workloads: list[Workload], *, seconds: float, slice_seconds: float) -> None:
    """Alternate the workloads in short slices so that load from elsewhere on the machine
    hits all of them alike, then print each one's calls per second."""
    for workload in workloads:
        await workload.run_for(WARM_UP_SECONDS, count=False)
    for _ in range(max(1, round(seconds / slice_seconds))):
        for workload in workloads:
            await workload.run_for(slice_seconds)
    for workload in workloads:
        print(
            f"  {workload.name:<24} {workload.rate:8.0f} reads/s "
            f"({workload.done} in {workload.elapsed:.1f}s)",
            flush=True,
        )
        if line := workload.cpu_line():
            print(line, flush=True)


class Http11Connection:
    """One keep-alive HTTP/1.1 connection sending the same GET again and again."""

    def __init__(self, host: str, port: int, request: bytes) -> None:
        self._host, self._port, self._request = host, port, request
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def get(self) -> None:
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        self._writer.write(self._request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = head[9:12]
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await self._reader.readexactly(length)
        if status != b"200":
            raise RuntimeError(f"GET /auth/profile answered {status.decode()}")


async def run(args: argparse.Namespace) -> None:
    settings = load_settings(args.profile)
    stack = Stack(args.profile, echo=None)

    def sample_cpu() -> CpuSample:
        return sample_server_cpu(stack)

    gateway = args.gateway or f"127.0.0.1:{settings.gateway_port}"
    auth = args.auth or f"127.0.0.1:{settings.auth_grpc_port}"
    username = f"bench_{uuid.uuid4().hex[:10]}"
    registered = await asyncio.to_thread(
        httpx.post,
        f"http://{gateway}/auth/register",
        json={
            "fullname": "Bench Reader",
            "email": f"{username}@example.com",
            "username": username,
            "phone": "+849" + str(uuid.uuid4().int)[:9],
            "password": "bench-pass-1",
            "birthday": "1990-01-01",
        },
        timeout=30,
    )
    registered.raise_for_status()
    token = registered.json()["access_token"]
    metadata = (("authorization", f"Bearer {token}"),)
    request = (
        f"GET /auth/profile HTTP/1.1\r\nHost: {gateway}\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()

    print(
        f"profile reads, concurrency {args.concurrency}, {args.seconds:.0f}s each in "
        f"{args.slice:g}s slices "
        f"(load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores)"
    )
    host, port = gateway.split(":")
    async with (
        grpc.aio.insecure_channel(gateway) as via_gateway,
        grpc.aio.insecure_channel(auth) as direct,
    ):

        def profile_call(channel: grpc.aio.Channel) -> Call:
            stub = auth_pb2_grpc.AuthServiceStub(channel)

            async def call() -> None:
                await stub.GetProfile(auth_pb2.GetProfileRequest(), metadata=metadata)

            return call

        def health_call() -> Call:
            stub = health_pb2_grpc.HealthStub(direct)

            async def call() -> None:
                await stub.Check(health_pb2.HealthCheckRequest())

            return call

        rest = Workload(
            "REST via gateway",
            lambda: Http11Connection(host, int(port), request).get,
            args.concurrency,
            sample_cpu,
        )
        grpc_gateway = Workload(
            "gRPC via gateway", lambda: profile_call(via_gateway), args.concurrency, sample_cpu
        )
        grpc_direct = Workload(
            "gRPC direct to auth", lambda: profile_call(direct), args.concurrency, sample_cpu
        )
        floor = Workload("health check to auth", health_call, args.concurrency, sample_cpu)
        await compare(
            [rest, grpc_gateway, grpc_direct, floor],
            seconds=args.seconds,
            slice_seconds=args.slice,
        )
    print(
        f"  ratio REST via gateway / direct gRPC: {rest.rate / grpc_direct.rate:.2f} (goal >= 0.70)"
    )
    print(f"  ratio gRPC via gateway / direct gRPC: {grpc_gateway.rate / grpc_direct.rate:.2f}")


def upstream_answers(admin_url: str, cluster: str = "auth") -> dict[str, int]:
    """Requests answered so far by each endpoint of ``cluster`` (Envoy admin ``/clusters``:
    lines ``<cluster>::<endpoint>::rq_total::<count>``)."""
    answers: dict[str, int] = {}
    for line in httpx.get(f"{admin_url}/clusters", timeout=5).text.splitlines():
        where, marker, value = [*line.rsplit("::", 2), "", ""][:3]
        name, _, endpoint = where.partition("::")
        if name == cluster and marker == "rq_total":
            answers[Path(endpoint).name or endpoint] = int(value)
    return answers


def envoy_counters(admin_url: str) -> dict[str, int]:
    """Envoy's counters that say whether it serialized the reads: downstream connections
    per worker thread (``listener.<address>.worker_<n>.downstream_cx_total``) and the auth
    cluster's upstream connections and requests that waited for one (``upstream_rq_pending_
    total``: no connection or stream free)."""
    wanted = ("downstream_cx_total", "upstream_cx_total", "upstream_rq_pending_total")
    counters: dict[str, int] = {}
    for line in httpx.get(f"{admin_url}/stats", timeout=5).text.splitlines():
        name, _, value = line.partition(": ")
        if not name.endswith(wanted) or not value.strip().isdigit():
            continue
        if (name.startswith("listener.") and ".worker_" in name) or name.startswith(
            "cluster.auth."
        ):
            counters[name] = int(value)
    return counters


def process_ticks(stack: Stack) -> dict[str, int]:
    """CPU ticks so far of every stack process, as ``component[pid]``."""
    ticks: dict[str, int] = {}
    for component, pids in stack.processes().items():
        for pid in pids:
            used = cpu_ticks(pid)
            if used is not None:
                ticks[f"{component}[{pid}]"] = used
    return ticks


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def vegeta_run(args: argparse.Namespace) -> None:
    settings = load_settings(args.profile)
    stack = Stack(args.profile, echo=None)
    gateway = args.gateway or f"127.0.0.1:{settings.gateway_port}"
    admin_url = f"http://127.0.0.1:{settings.envoy_admin_port}"
    async with Gateway(f"http://{gateway}") as client:
        users = await client.register_many(args.users, "reads", login_once=False)
    targets = profile_targets(f"http://{gateway}", users)
    per_second = os.sysconf("SC_CLK_TCK")
    with tempfile.TemporaryDirectory(prefix="profile-reads-") as directory:
        # A short warm-up: connections opened, caches filled, workers' code paths warm.
        await asyncio.to_thread(
            attack, "warm-up", targets, Path(directory), duration_s=3, rate=None, workers=8
        )
        answered_before, ticks_before = upstream_answers(admin_url), process_ticks(stack)
        envoy_before = envoy_counters(admin_url)
        vegeta_before, began = children_cpu_seconds(), time.monotonic()
        load_before = os.getloadavg()[0]
        summary = await asyncio.to_thread(
            attack,
            "reads",
            targets,
            Path(directory),
            duration_s=args.seconds,
            rate=args.rate or None,
            workers=args.concurrency,
            max_workers=max(args.concurrency, math.ceil(args.rate * 2)) if args.rate else None,
            window=(min(2.0, args.seconds / 4), args.seconds),
        )
        # Both samples bracket vegeta's run only; encoding and summing up come after.
        elapsed = time.monotonic() - began
    ticks_after, answered_after = process_ticks(stack), upstream_answers(admin_url)
    envoy_after = envoy_counters(admin_url)
    vegeta_seconds = children_cpu_seconds() - vegeta_before
    latency = summary["metrics"]["op_profile_ms"]["values"]
    ok = int(summary["metrics"]["op_profile_ok_ms"]["values"]["count"])
    statuses = summary["statuses"]["profile"]
    model = f"{args.rate:g}/s offered" if args.rate else f"{args.concurrency} connections, closed"
    print(
        f"profile reads via vegeta ({model}, {args.seconds:g}s, {len(users)} users; load "
        f"average {load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end, "
        f"{os.cpu_count()} cores)"
    )
    print(
        f"  {ok / elapsed:8.0f} reads/s answered 200 ({ok} of {sum(statuses.values())}, "
        f"statuses {statuses}); p50 {latency['med']:.1f} p95 {latency['p(95)']:.1f} "
        f"p99 {latency['p(99)']:.1f} ms"
    )
    used = {
        name: (ticks - ticks_before.get(name, 0)) / per_second
        for name, ticks in ticks_after.items()
    }
    by_component: dict[str, float] = {}
    for name, seconds in used.items():
        component = name.partition("[")[0]
        by_component[component] = by_component.get(component, 0.0) + seconds
    servers = sum(by_component.values())
    print(
        f"  server CPU {servers * 1000 / ok:.3f} ms/read ({servers / elapsed:.2f} cores): "
        + ", ".join(
            f"{name} {seconds * 1000 / ok:.3f}"
            for name, seconds in sorted(by_component.items(), key=lambda item: -item[1])
            if seconds * 1000 / ok >= 0.005
        )
    )
    print(
        "  by process (cores): "
        + ", ".join(
            f"{name} {seconds / elapsed:.2f}"
            for name, seconds in sorted(used.items(), key=lambda item: -item[1])
            if seconds / elapsed >= 0.02
        )
    )
    print(
        f"  vegeta {vegeta_seconds * 1000 / ok:.3f} ms/read ({vegeta_seconds / elapsed:.2f} "
        f"cores); servers + vegeta {(servers + vegeta_seconds) / elapsed:.2f} of "
        f"{os.cpu_count()} cores"
    )
    spread = {
        endpoint: count - answered_before.get(endpoint, 0)
        for endpoint, count in answered_after.items()
    }
    total = sum(spread.values()) or 1
    print(
        "  auth endpoints (Envoy's share of the requests): "
        + ", ".join(f"{endpoint} {count / total:.0%}" for endpoint, count in spread.items())
    )
    grown = {
        name: count - envoy_before.get(name, 0)
        for name, count in envoy_after.items()
        if count != envoy_before.get(name, 0)
    }
    threads = {
        name.split(".worker_")[1].split(".")[0]: count
        for name, count in grown.items()
        if ".worker_" in name
    }
    print(
        "  Envoy: connections accepted per worker thread "
        + (", ".join(f"{thread}: {count}" for thread, count in sorted(threads.items())) or "none")
        + f"; auth upstream connections opened {grown.get('cluster.auth.upstream_cx_total', 0)}"
        f", requests that waited for one {grown.get('cluster.auth.upstream_rq_pending_total', 0)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="test", choices=["dev", "test"])
    parser.add_argument("--seconds", type=float, default=10, help="measured time per kind")
    parser.add_argument("--slice", type=float, default=1, help="seconds per alternation")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--gateway", help="host:port of the gateway (default: the profile's)")
    parser.add_argument("--auth", help="host:port of the auth service (default: the profile's)")
    parser.add_argument(
        "--vegeta", action="store_true", help="REST via the gateway with vegeta (see above)"
    )
    parser.add_argument(
        "--rate", type=float, default=0, help="--vegeta: reads/s offered (0: closed model)"
    )
    parser.add_argument("--users", type=int, default=50, help="--vegeta: users whose tokens read")
    args = parser.parse_args()
    asyncio.run(vegeta_run(args) if args.vegeta else run(args))


if __name__ == "__main__":
    main()
