"""What the revocation check costs profile reads: the same auth service with and without it,
measured in one run on one machine. Prints numbers; asserts only that the comparison is real.

Every protected RPC of every service asks the shared revocation list (one Redis ``EXISTS`` of
the session and token keys) whether its token was revoked. To see what that costs, this starts
two extra auth servers from the real composition root on the running stack's PostgreSQL and
Redis, identical except that in one of them ``RevocationList.is_revoked`` answers "not
revoked" without asking Redis (a change made in that benchmark process only; the product
has no switch for it). It then alternates short slices of ``GetProfile`` calls (direct gRPC,
the same token, the same concurrency) between the two and prints, for each, reads per second
and the auth process's CPU time per read (from ``/proc``), and the throughput lost to the
check. Goal (issue 14): at most 10 % fewer profile reads per second.

Finally it proves the two servers differ in that check and nothing else it can see: the token
is logged out through the checking server, which then refuses it while the other still
serves it. A run where that does not hold exits non-zero.

Run against a running stack (``make up``, or the test stack)::

    uv run python bench/revocation_cost.py --profile dev --seconds 20 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from cake.auth.v1 import auth_pb2, auth_pb2_grpc
from cake_devtools.stack import service_environment

WARM_UP_SECONDS = 2.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    address: str
    reads: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.reads / self.seconds

    @property
    def cpu_per_read_ms(self) -> float:
        return 1000 * self.cpu / self.reads


def serve_child(check: bool) -> None:
    """Runs in the child process: the auth server, with or without the revocation check."""
    from cake_auth.bootstrap import serve
    from cake_auth.settings import AuthSettings
    from cake_common.jwt import Principal
    from cake_common.revocation import RevocationList

    if not check:

        async def never_revoked(self: RevocationList, principal: Principal) -> bool:
            return False

        RevocationList.is_revoked = never_revoked  # type: ignore[method-assign]
    asyncio.run(serve(AuthSettings()))


@contextmanager
def auth_server(name: str, *, check: bool, profile: str) -> Iterator[Server]:
    port = free_port()
    env = dict(os.environ)
    env.update(service_environment(profile)["auth"])
    env.update(
        CAKE_AUTH_GRPC_PORT=str(port),
        CAKE_AUTH_METRICS_PORT=str(free_port()),
        CAKE_AUTH_LOG_LEVEL="WARNING",
        # One process: the patched check must be the serving process's, and /proc's CPU
        # figure that process's (the stack may run auth as several workers).
        CAKE_AUTH_WORKERS="1",
    )
    mode = "with" if check else "without"
    process = subprocess.Popen(
        [sys.executable, __file__, "--child", mode],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    server = Server(name, process, f"127.0.0.1:{port}")
    try:
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def wait_serving(server: Server, within_seconds: float = 60) -> None:
    deadline = time.monotonic() + within_seconds
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        while True:
            if server.process.poll() is not None:
                error = (
                    server.process.stderr.read().decode(errors="replace")
                    if (server.process.stderr)
                    else ""
                )
                raise SystemExit(f"{server.name} auth server exited:\n{error[-3000:]}")
            try:
                await stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=2)
                return
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


async def run_slice(
    server: Server, stub: auth_pb2_grpc.AuthServiceStub, metadata: tuple[tuple[str, str], ...],
    *, concurrency: int, seconds: float, count: bool,
) -> None:  # fmt: skip
    until = time.monotonic() + seconds
    reads = 0
    latencies: list[float] = []

    async def loop() -> None:
        nonlocal reads
        while time.monotonic() < until:
            began = time.perf_counter()
            await stub.GetProfile(auth_pb2.GetProfileRequest(), metadata=metadata, timeout=10)
            latencies.append(time.perf_counter() - began)
            reads += 1

    cpu_before, began = cpu_seconds(server.process.pid), time.monotonic()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    if count:
        server.reads += reads
        server.seconds += time.monotonic() - began
        server.cpu += cpu_seconds(server.process.pid) - cpu_before
        server.latencies.extend(latencies)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run(args: argparse.Namespace) -> int:
    with (
        auth_server("with check", check=True, profile=args.profile) as checked,
        auth_server("without check", check=False, profile=args.profile) as unchecked,
    ):
        await asyncio.gather(wait_serving(checked), wait_serving(unchecked))
        async with (
            grpc.aio.insecure_channel(checked.address) as checked_channel,
            grpc.aio.insecure_channel(unchecked.address) as unchecked_channel,
        ):
            stubs = {
                checked.name: auth_pb2_grpc.AuthServiceStub(checked_channel),
                unchecked.name: auth_pb2_grpc.AuthServiceStub(unchecked_channel),
            }
            username = f"revbench_{uuid.uuid4().hex[:10]}"
            registered = await stubs[checked.name].Register(
                auth_pb2.RegisterRequest(
                    fullname="Revocation Bench",
                    email=f"{username}@example.com",
                    username=username,
                    phone="+849" + str(uuid.uuid4().int)[:8],
                    password="bench-pass-1",  # noqa: S106 - a throwaway bench account
                    birthday="1990-01-01",
                ),
                timeout=30,
            )
            metadata = (("authorization", f"Bearer {registered.access_token}"),)
            load = os.getloadavg()[0]
            print(
                f"profile reads (direct gRPC GetProfile), concurrency {args.concurrency}, "
                f"{args.seconds:g}s per server in {args.slice:g}s slices "
                f"(load average at start: {load:.2f} on {os.cpu_count()} cores)",
                flush=True,
            )
            servers = (checked, unchecked)
            for server in servers:
                await run_slice(
                    server, stubs[server.name], metadata,
                    concurrency=args.concurrency, seconds=WARM_UP_SECONDS, count=False,
                )  # fmt: skip
            for _ in range(max(1, round(args.seconds / args.slice))):
                for server in servers:
                    await run_slice(
                        server, stubs[server.name], metadata,
                        concurrency=args.concurrency, seconds=args.slice, count=True,
                    )  # fmt: skip
            for server in servers:
                print(
                    f"  {server.name:<14} {server.rate:8.0f} reads/s  "
                    f"auth CPU {server.cpu_per_read_ms:.3f} ms/read  "
                    f"p50 {1000 * percentile(server.latencies, 0.5):.1f} ms  "
                    f"p99 {1000 * percentile(server.latencies, 0.99):.1f} ms  "
                    f"({server.reads} reads)",
                    flush=True,
                )
            loss = 1 - checked.rate / unchecked.rate
            extra_cpu = checked.cpu_per_read_ms - unchecked.cpu_per_read_ms
            print(
                f"  throughput lost to the check: {100 * loss:.1f} % (goal <= 10 %); "
                f"auth CPU per read +{1000 * extra_cpu:.0f} us "
                f"(load average at end: {os.getloadavg()[0]:.2f})"
            )

            # The comparison is only meaningful if the check really differs.
            await stubs[checked.name].Logout(auth_pb2.LogoutRequest(), metadata=metadata)
            refused = None
            try:
                await stubs[checked.name].GetProfile(
                    auth_pb2.GetProfileRequest(), metadata=metadata
                )
            except grpc.aio.AioRpcError as error:
                refused = error.code()
            served = await stubs[unchecked.name].GetProfile(
                auth_pb2.GetProfileRequest(), metadata=metadata
            )
            if refused is not grpc.StatusCode.UNAUTHENTICATED or served.user.username != username:
                print(f"  NOT A VALID COMPARISON: after logout the checking server answered "
                      f"{refused}, the other {served.user.username!r}")  # fmt: skip
                return 1
            print(
                "  after logout: the checking server refuses the token (UNAUTHENTICATED), "
                "the other still serves it: the servers differ in the check"
            )
            if args.goal and loss > 0.10:
                return 2
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="dev", choices=["dev", "test"])
    parser.add_argument("--seconds", type=float, default=20, help="measured time per server")
    parser.add_argument("--slice", type=float, default=1, help="seconds per alternation")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--goal", action="store_true", help="exit 2 if more than 10 %% is lost")
    parser.add_argument("--child", choices=["with", "without"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        serve_child(check=args.child == "with")
        return
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
