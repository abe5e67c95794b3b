"""Milliseconds per bcrypt check of each password hasher the auth service can use.

    uv run --frozen python bench/hash_check.py [--cost 10] [--checks 20] [--threads N]

For each implementation (libxcrypt's ``crypt_rn`` through ctypes, pyca ``bcrypt``) it prints
the wall-clock and CPU time of one check (one thread, median of ``--checks``) and the checks
per second that ``--threads`` threads reach flat out through the service's own hasher (the
thread pool; this shows whether the GIL is released). Other load on the machine skews the
figures: the load average is printed at start and end.
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
    Libxcrypt,
    LibxcryptThreadPoolHasher,
    ThreadPoolHasher,
    available_cpus,
)

PASSWORD = "bench-password-1"  # noqa: S105 - a benchmark's input


def _load() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def _one_check(check: Callable[[], bool], checks: int) -> tuple[float, float]:
    """Median wall-clock and CPU seconds of one ``check()``."""
    walls: list[float] = []
    cpus: list[float] = []
    for _ in range(checks):
        wall, cpu = time.perf_counter(), time.thread_time()
        if not check():
            raise SystemExit("a benchmark check did not match: the hasher is broken")
        walls.append(time.perf_counter() - wall)
        cpus.append(time.thread_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


async def _parallel_rate(hasher: ThreadPoolHasher, stored: str, checks: int) -> float:
    try:
        started = time.perf_counter()
        results = await asyncio.gather(*(hasher.verify(PASSWORD, stored) for _ in range(checks)))
        elapsed = time.perf_counter() - started
    finally:
        await hasher.close()
    if not all(results):
        raise SystemExit("a benchmark check did not match: the hasher is broken")
    return checks / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cost", type=int, default=10)
    parser.add_argument("--checks", type=int, default=20)
    parser.add_argument("--threads", type=int, default=available_cpus())
    args = parser.parse_args()

    stored = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(args.cost)).decode()
    library = Libxcrypt()
    print(f"load average {_load()} at start; cost {args.cost}; {available_cpus()} usable cores")
    implementations: list[tuple[str, Callable[[], bool], ThreadPoolHasher]] = [
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
        rate = asyncio.run(_parallel_rate(hasher, stored, args.checks * args.threads))
        print(
            f"{name:30} {wall * 1000:6.1f} ms per check ({cpu * 1000:.1f} ms CPU); "
            f"{args.threads} threads: {rate:6.1f} checks/s"
        )
    print(f"load average {_load()} at end")


if __name__ == "__main__":
    main()
