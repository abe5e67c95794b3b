"""Ceilings measured in the same run as the scenarios, so every figure has a denominator.

- bcrypt: the checks per second the auth service's hasher (cake_bcrypt's lanes by default)
  gives flat out on every core (``auth_grpc.parallel_bcrypt_rate``): the most logins/s that
  hasher can do here; and the time of one check alone (``auth_grpc.bcrypt_check_seconds``).
- gRPC: a trivial grpc.aio echo server (own process) under a grpc.aio client: the most
  unary calls/s Python gRPC does on this box, with no work behind them.
- Envoy: a throwaway Envoy whose only route is a ``direct_response``, loaded by vegeta: the most
  requests/s the gateway binary itself serves, with no upstream.

Run alone: ``uv run python bench/ceilings.py`` (``echo-server PORT`` is the echo child).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from auth_grpc import bcrypt_check_seconds, parallel_bcrypt_rate
from benchlib import metric, percentile, say
from cake_devtools.stack.envoy import envoy_binary
from loadgen import Target, attack

ECHO_METHOD = "/bench.Echo/Echo"


@dataclass
class LoadResult:
    """Throughput and latency of a closed-model load (latencies in ms)."""

    name: str
    rate: float
    p50: float
    p95: float
    p99: float
    error_rate: float
    count: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def bcrypt_ceiling(cost: int, hasher: str = "lanes") -> dict[str, float]:
    say(f"ceiling: timing one bcrypt check alone at cost {cost} ({hasher}), then flat out")
    wall, cpu = bcrypt_check_seconds(cost, hasher=hasher)
    cores = os.cpu_count() or 1
    return {
        "cost": cost,
        "check_ms": wall * 1000,
        "cpu_ms": cpu * 1000,
        "cores": cores,
        "logins_per_second": parallel_bcrypt_rate(cost, cores, hasher=hasher),
        # One check at a time per core: what sizes the scenarios' rates (with the lanes
        # hasher the flat-out rate is well above what the rest of a login lets the stack
        # serve on the same cores).
        "one_at_a_time_per_second": cores / wall,
    }


async def closed_loop(
    name: str, call: Callable[[], Awaitable[object]], *, concurrency: int, seconds: float
) -> LoadResult:
    """``concurrency`` loops calling ``call`` for ``seconds``; exceptions count as errors."""
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def loop() -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                await call()
            except Exception:
                errors += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    total = len(latencies) + errors
    return LoadResult(
        name=name,
        rate=len(latencies) / elapsed,
        p50=percentile(latencies, 0.50),
        p95=percentile(latencies, 0.95),
        p99=percentile(latencies, 0.99),
        error_rate=errors / total if total else 0.0,
        count=len(latencies),
    )


async def serve_echo(port: int) -> None:
    async def echo(request: bytes, _: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def grpc_echo_ceiling(seconds: float, concurrency: int = 32) -> LoadResult:
    port = free_port()
    say(
        f"ceiling: grpc.aio echo server (own process) on :{port},"
        f" {concurrency} callers, {seconds:.0f}s"
    )
    # Started once before the timed part; the blocking spawn does not skew the measurement.
    child = subprocess.Popen([sys.executable, __file__, "echo-server", str(port)])  # noqa: ASYNC220
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 20)
            echo = channel.unary_unary(ECHO_METHOD, None, None)
            return await closed_loop(
                "grpc echo", lambda: echo(b"ping"), concurrency=concurrency, seconds=seconds
            )
    finally:
        child.terminate()
        child.wait(10)


HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
    ".HttpConnectionManager"
)
ENVOY_CONFIG = """
static_resources:
  listeners:
  - address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm_type}
          stat_prefix: bench
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                direct_response: {{status: 200, body: {{inline_string: "ok"}}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""


def envoy_direct_response_ceiling(directory: Path, seconds: float, vus: int = 16) -> LoadResult:
    port = free_port()
    config = directory / "envoy-direct-response.yaml"
    config.write_text(ENVOY_CONFIG.format(port=port, hcm_type=HCM_TYPE))
    say(
        f"ceiling: Envoy direct_response on :{port} (concurrency 2), "
        f"vegeta {vus} connections, {seconds:.0f}s"
    )
    log = (directory / "envoy-direct-response.log").open("w")
    envoy = subprocess.Popen(
        [envoy_binary(), "-c", str(config), "--concurrency", "2", "--base-id", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        summary = attack(
            "envoy_direct_response",
            [Target.get("get", f"http://127.0.0.1:{port}/")],
            directory,
            duration_s=seconds,
            rate=None,
            workers=vus,
        )
    finally:
        envoy.terminate()
        envoy.wait(10)
        log.close()
    return vegeta_closed_result("envoy direct_response", summary, "op_get_ms", "op_get_failed")


def vegeta_closed_result(name: str, summary: dict[str, Any], trend: str, failed: str) -> LoadResult:
    latency = metric(summary, trend)
    duration_s = summary["state"]["testRunDurationMs"] / 1000
    count = int(latency.get("count", 0))
    return LoadResult(
        name=name,
        rate=count / duration_s if duration_s else 0.0,
        p50=latency.get("med", 0.0),
        p95=latency.get("p(95)", 0.0),
        p99=latency.get("p(99)", 0.0),
        error_rate=metric(summary, failed).get("rate", 0.0),
        count=count,
    )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "echo-server":
        asyncio.run(serve_echo(int(sys.argv[2])))
        return
    print(bcrypt_ceiling(10))
    print(asyncio.run(grpc_echo_ceiling(5)).as_dict())
    with tempfile.TemporaryDirectory() as directory:
        print(envoy_direct_response_ceiling(Path(directory), 5).as_dict())


if __name__ == "__main__":
    main()
