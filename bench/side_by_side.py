"""``make bench PEER_URL=http://host:port``: the same open-model scenarios against Cake's
gateway and a peer system with the Cake System's REST API (POST /auth/register, POST
/auth/login, GET /auth/profile, POST /auth/refresh), one after the other in one run, and
their ratios.

Each side gets its own seeded users (registered and logged in once through its own API),
then, at the same offered rates: profile reads, logins alone, and the 70/20/10 auth mix.
The peer must answer before anything starts: a URL that does not answer ends the run at
once with the reason.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from benchlib import (
    CpuSample,
    Gateway,
    SeededUser,
    sample_server_cpu,
    say,
    server_cpu,
    statuses_total,
)
from cake_devtools.stack import Stack
from loadgen import attack
from report import print_server_cpu
from scenarios import mix_counts, mixed_auth_targets, profile_targets, sessions_for_refresh

MIX = (70.0, 20.0, 10.0)
PROBE_TIMEOUT_SECONDS = 5


def probe_peer(peer_url: str) -> None:
    """Raise ``SystemExit`` unless ``peer_url`` answers HTTP at all (any status)."""
    try:
        response = httpx.post(
            f"{peer_url}/auth/login",
            json={"account": "bench-probe", "password": "bench-probe"},
            timeout=PROBE_TIMEOUT_SECONDS,
        )
    except httpx.HTTPError as error:
        raise SystemExit(
            f"the peer at {peer_url} does not answer ({type(error).__name__}: {error}); "
            "start it first or leave PEER_URL out"
        ) from error
    if response.status_code >= 500:
        raise SystemExit(
            f"the peer at {peer_url} answers POST /auth/login with {response.status_code}: "
            f"{response.text[:200]}"
        )
    say(f"peer {peer_url} answers (POST /auth/login with a stranger -> {response.status_code})")


def _figures(summary: dict[str, Any], op: str) -> dict[str, float]:
    values = summary["metrics"].get(f"op_{op}_ms", {}).get("values", {})
    failed = summary["metrics"].get(f"op_{op}_failed", {}).get("values", {}).get("rate", 0.0)
    seconds = summary["state"]["testRunDurationMs"] / 1000
    count = values.get("count", 0.0)
    return {
        "count": count,
        "ok_per_second": count * (1 - failed) / seconds if seconds else 0.0,
        "p50": values.get("med", 0.0),
        "p95": values.get("p(95)", 0.0),
        "p99": values.get("p(99)", 0.0),
        "error_rate": failed,
    }


async def _one_side(
    name: str,
    base_url: str,
    args: argparse.Namespace,
    out: Path,
    rates: dict[str, float],
    *,
    sample: Callable[[], CpuSample] | None = None,
) -> dict[str, Any]:
    """The scenarios against one side; with ``sample`` (Cake's side: its processes are
    known), each scenario's figures carry the servers' CPU per request too."""
    directory = out / name
    directory.mkdir(parents=True, exist_ok=True)
    say(f"{name}: seeding {args.users} users through {base_url}")
    async with Gateway(base_url) as gateway:
        users: list[SeededUser] = await gateway.register_many(args.users, "peer", login_once=True)
        total, refreshes = mix_counts(rates["mix"], args.duration, MIX[0], refresh=True)
        refresh_tokens = await sessions_for_refresh(gateway, users, refreshes)
    figures: dict[str, Any] = {}
    cpu: dict[str, Any] = {}

    def with_cpu(scenario: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        before = sample() if sample is not None else None
        summary = run()
        if sample is not None and before is not None:
            cpu[scenario] = server_cpu(before, sample(), statuses_total(summary))
        return summary

    profile = with_cpu(
        "profile reads",
        lambda: attack(
            f"{name}-profile",
            profile_targets(base_url, users),
            directory,
            duration_s=args.duration,
            rate=rates["profile"],
            workers=max(10, math.ceil(rates["profile"] / 10)),
        ),
    )
    figures["profile reads"] = _figures(profile, "profile")
    logins_total, _ = mix_counts(rates["login"], args.duration, 100, refresh=False)
    logins = with_cpu(
        "logins alone",
        lambda: attack(
            f"{name}-logins",
            mixed_auth_targets(base_url, users, total=logins_total, mix=(100, 0, 0)),
            directory,
            duration_s=args.duration,
            rate=rates["login"],
            workers=max(10, math.ceil(rates["login"] * 2)),
        ),
    )
    figures["logins alone"] = _figures(logins, "login")
    mix = with_cpu(
        "mix",
        lambda: attack(
            f"{name}-mix",
            mixed_auth_targets(
                base_url, users, total=total, mix=MIX, refresh_tokens=refresh_tokens
            ),
            directory,
            duration_s=args.duration,
            rate=rates["mix"],
            workers=max(10, math.ceil(rates["mix"] * 2)),
        ),
    )
    for op in ("login", "register", "profile", "refresh"):
        figures[f"mix: {op}"] = _figures(mix, op)
    if sample is not None:
        figures["server_cpu"] = cpu
    return figures


async def side_by_side(
    args: argparse.Namespace, out: Path, cake_url: str, peer_url: str, stack: Stack
) -> dict[str, Any]:
    rates = {
        "profile": args.peer_profile_rate,
        "login": args.peer_login_rate,
        "mix": args.peer_mix_rate,
    }
    say(f"side by side at {rates} per second, {args.duration:g}s each")
    cake = await _one_side(
        "cake", cake_url, args, out, rates, sample=lambda: sample_server_cpu(stack)
    )
    peer = await _one_side("peer", peer_url, args, out, rates)
    return {"peer_url": peer_url, "offered_rates": rates, "cake": cake, "peer": peer}


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}" if denominator else "-"


def print_comparison(result: dict[str, Any]) -> None:
    print(f"\n=== Cake vs peer ({result['peer_url']}), offered {result['offered_rates']} ===")
    print(
        f"{'scenario':18} {'cake ok/s':>9} {'peer ok/s':>9} {'x':>5}   "
        f"{'cake p95':>8} {'peer p95':>8} {'x':>5}   {'cake p99':>8} {'peer p99':>8}   "
        f"{'cake err':>8} {'peer err':>8}"
    )
    for scenario, cake in result["cake"].items():
        if scenario == "server_cpu":
            continue
        peer = result["peer"][scenario]
        print(
            f"{scenario:18} {cake['ok_per_second']:9.1f} {peer['ok_per_second']:9.1f} "
            f"{_ratio(cake['ok_per_second'], peer['ok_per_second']):>5}   "
            f"{cake['p95']:8.1f} {peer['p95']:8.1f} {_ratio(peer['p95'], cake['p95']):>5}   "
            f"{cake['p99']:8.1f} {peer['p99']:8.1f}   "
            f"{cake['error_rate']:8.1%} {peer['error_rate']:8.1%}"
        )
    print("x: Cake ÷ peer for throughput, peer ÷ Cake for latency (> 1: Cake is better)")
    if "server_cpu" in result["cake"]:
        print_server_cpu(result["cake"]["server_cpu"], title="Cake's servers")
