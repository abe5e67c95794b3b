"""Milliseconds per bcrypt check of each password hasher the auth service can use.

    uv run --frozen python bench/hash_check.py [--cost 10] [--checks 20] [--threads N]

For each implementation (cake_bcrypt's lanes, the default; libxcrypt's ``crypt_rn`` through
ctypes; pyca ``bcrypt``) it prints the wall-clock and CPU time of one check alone (median of
``--checks``, one after the other) and the checks per second that ``--threads`` threads reach
flat out through the service's own hasher (``--lanes`` lanes per thread for cake_bcrypt; for
the others this shows whether the GIL is released), with the CPU per check that costs. Then,
for cake_bcrypt, the CPU per check of 1, 2, ... ``--lanes`` checks started together on one
thread (what the auth service's wait for a partner buys: docs/decisions/0011). Other load on
the machine skews the figures: the load average is printed at start and end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Callable

import bcrypt
from cake_auth.adapters.password_hashers import (
    BcryptThreadPoolHasher,
    LanesHasher,
    Libxcrypt,
    LibxcryptThreadPoolHasher,
    ThreadPoolHasher,
    available_cpus,
)
from cake_bcrypt import BcryptEngine, bcrypt_key, encode_hash, parse_hash

PASSWORD = "bench-password-1"  # noqa: S105 - a benchmark's input


def _load() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def _one_check(check: Callable[[], bool], checks: int) -> tuple[float, float]:
    """Median wall-clock and CPU seconds (of the whole process: a hasher's own threads
    included) of one ``check()``."""
    walls: list[float] = []
    cpus: list[float] = []
    for _ in range(checks):
        wall, cpu = time.perf_counter(), time.process_time()
        if not check():
            raise SystemExit("a benchmark check did not match: the hasher is broken")
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


async def _parallel_rate(
    hasher: ThreadPoolHasher | LanesHasher, stored: str, checks: int
) -> tuple[float, float]:
    """Checks per second flat out, and CPU seconds per check."""
    try:
        started, cpu = time.perf_counter(), time.process_time()
        results = await asyncio.gather(*(hasher.verify(PASSWORD, stored) for _ in range(checks)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        await hasher.close()
    if not all(results):
        raise SystemExit("a benchmark check did not match: the hasher is broken")
    return checks / elapsed, cpu / checks


def _engine_check(engine: BcryptEngine, stored: str) -> Callable[[], bool]:
    setting = parse_hash(stored)

    def check() -> bool:
        digest = engine.submit(bcrypt_key(PASSWORD.encode()), setting.salt, setting.cost)
        return encode_hash(setting, digest.result()) == stored

    return check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cost", type=int, default=10)
    parser.add_argument("--checks", type=int, default=20)
    parser.add_argument("--threads", type=int, default=available_cpus())
    parser.add_argument("--lanes", type=int, default=4, help="lanes per cake_bcrypt thread")
    args = parser.parse_args()

    stored = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(args.cost)).decode()
    library = Libxcrypt()
    print(f"load average {_load()} at start; cost {args.cost}; {available_cpus()} usable cores")
    engine = BcryptEngine(lanes=args.lanes)
    implementations: list[tuple[str, Callable[[], bool], ThreadPoolHasher | LanesHasher]] = [
        (
            f"cake_bcrypt ({args.lanes} lanes)",
            _engine_check(engine, stored),
            LanesHasher(args.cost, args.threads, args.lanes),
        ),
        (
            "libxcrypt (crypt_rn, ctypes)",
            lambda: library.verify(PASSWORD, stored),
            LibxcryptThreadPoolHasher(args.cost, args.threads, library),
        ),
        (
            "pyca bcrypt",
            lambda: bcrypt.checkpw(PASSWORD.encode(), stored.encode()),
            BcryptThreadPoolHasher(args.cost, args.threads),
        ),
    ]
    for name, check, hasher in implementations:
        wall, cpu = _one_check(check, args.checks)
        concurrency = hasher.concurrency
        rate, cpu_each = asyncio.run(_parallel_rate(hasher, stored, args.checks * concurrency))
        print(
            f"{name:30} alone {wall * 1000:6.1f} ms per check ({cpu * 1000:.1f} ms CPU); "
            f"{args.threads} threads flat out: {rate:6.1f} checks/s "
            f"({cpu_each * 1000:.1f} ms CPU per check)"
        )
    setting = parse_hash(stored)
    key = bcrypt_key(PASSWORD.encode())
    for together in range(1, args.lanes + 1):
        started = time.process_time()
        for _ in range(args.checks):
            futures = [engine.submit(key, setting.salt, setting.cost) for _ in range(together)]
            for future in futures:
                future.result()
        cpu_each = (time.process_time() - started) / (args.checks * together)
        print(
            f"cake_bcrypt, {together} started together on one thread:"
            f" {cpu_each * 1000:.1f} ms CPU per check"
        )
    engine.close()
    print(f"load average {_load()} at end")


if __name__ == "__main__":
    main()
