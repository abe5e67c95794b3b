"""``make bench PEER_URL=http://host:port``: the goal mode. The same open-model loads against
Cake's gateway and a peer system with the Cake System's REST API (POST /auth/register, POST
/auth/login, GET /auth/profile) in one run, phase by phase (Cake, then
the peer, then the next phase: both sides of a comparison see the box in the same state),
and one table of the goals of issue 16 with Cake's figure, the peer's, the ratio, the
target and PASS/FAIL.

Phases (each side gets its own seeded users, registered and logged in once through its own
API; between phases each side is left to settle until its servers are back to their idle
CPU, since a peer without admission control is still working off abandoned requests):

1. idle: the servers' CPU with nothing offered (the baseline taken out of CPU per login);
2. logins at ``--cpu-login-rate`` (below both ceilings): server CPU per login, next to one
   bcrypt check's CPU by each side's hasher (Cake: its configured hasher in this process;
   the peer: Node ``bcrypt`` from its own ``node_modules``, when ``--peer-dir`` has it);
3. login saturation: logins offered at ``--saturation-rate`` (default: each side 1.2 x its
   own hash ceiling, above what it can serve: Cake's hasher flat out on every core, the
   peer's cores / one Node bcrypt check); the ceiling is the
   goodput of the steady part (successes completed between ``--warmup-seconds`` and the
   end of sending, per second);
4. overload: 1.5 x each side's ceiling for ``--overload-seconds`` (Cake's goals at Cake's;
   the peer at Cake's rate would work off abandoned logins for minutes): goodput, P95 of the
   accepted logins, the refusals (503/429, each checked for Retry-After, and how fast),
   client timeouts (no answer within ``--client-timeout``);
5. profile reads: saturation of each side (closed model, ``--profile-connections``), then
   Cake alone at 1.5 x the peer's saturation (open model): its P99;
6. the 70/20/10 auth mix (login, register, profile) at ``--peer-mix-rate`` for
   ``--mix-seconds`` on both: every operation's P95 and errors;
7. Cake's guards (no peer figure): the relay against a raw producer
   (``relay_throughput.measure``) and first-login -> voucher at 100 logins/s
   (``first_login_burst.burst``, judged by ``enrollment.goal_met``).

Server CPU: Cake's is every process of every stack component (``Stack.processes``); the
peer's, the processes listening on its URL's port and on the ports its work folder names
(``--peer-dir``: ``app/.env``), those its pid files name, ``--peer-ports``/``--peer-pids``,
each with its descendants (PostgreSQL's backends).

Writes ``side-by-side.json`` and ``goals.md`` (the table to paste in docs/performance.md);
exits 4 when a goal is not met. A peer that does not answer ends the run at once (exit 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from benchlib import (
    CpuSample,
    Gateway,
    SeededUser,
    cores_used,
    find_peer_processes,
    metric,
    require_raised_limits,
    sample_server_cpu,
    say,
    server_cpu,
    statuses_total,
)
from cake_auth.settings import AuthSettings
from cake_devtools.stack import Stack
from ceilings import bcrypt_ceiling
from loadgen import attack
from report import goal_table_lines, print_goal_table
from scenarios import mix_counts, mixed_auth_targets, profile_targets

MIX = (70.0, 20.0, 10.0)
MIX_OPS = ("login", "register", "profile")
PROBE_TIMEOUT_SECONDS = 5
NOT_MET_EXIT = 4

# The goals of issue 16 (ratios to the peer measured in the same run).
LOGIN_SATURATION_VS_PEER = 1.1
CPU_PER_LOGIN_MARGIN_MS = 3.0
OVERLOAD_FACTOR = 1.5
OVERLOAD_GOODPUT_SHARE = 0.95
OVERLOAD_ACCEPTED_P95_MS = 2000.0
REFUSED_AT_ONCE_P95_MS = 250.0
""""Refused at once": the P95 of the refusals' latency stays under this."""
PROFILE_VS_PEER = 2.0
PROFILE_LOAD_FACTOR = 1.5
PROFILE_P99_MS = 50.0
RELAY_VS_RAW = 0.5
ENROLLMENT_RATE = 100.0
VOUCHER_P99_MS = 250.0

SETTLE_MARGIN_CORES = 0.15
"""A side has settled when its servers use at most their idle CPU plus this."""
NODE_BCRYPT_CHECK = """
const bcrypt = require(process.argv[1]);
const cost = Number(process.argv[2]), checks = Number(process.argv[3]);
const hash = bcrypt.hashSync('bench-pass-123', cost);
bcrypt.compareSync('bench-pass-123', hash);
const cpu = process.cpuUsage(), started = process.hrtime.bigint();
for (let i = 0; i < checks; i++) bcrypt.compareSync('bench-pass-123', hash);
const wall = Number(process.hrtime.bigint() - started) / 1e6 / checks;
const used = process.cpuUsage(cpu);
console.log(JSON.stringify({check_ms: wall, cpu_ms: (used.user + used.system) / 1000 / checks}));
"""


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


@dataclass
class Side:
    """One system under test: its base URL, how to sample its servers' CPU, its users."""

    name: str
    url: str
    sample: Callable[[], CpuSample]
    directory: Path
    users: list[SeededUser] = field(default_factory=list)
    idle_cores: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)


# -- measuring ----------------------------------------------------------------------------------


def measure_idle(side: Side, seconds: float) -> None:
    before = side.sample()
    time.sleep(seconds)
    side.idle_cores = cores_used(before, side.sample())
    side.figures["idle_cores"] = side.idle_cores
    say(f"{side.name}: servers idle at {side.idle_cores:.3f} cores over {seconds:g}s")


def settle(side: Side, max_seconds: float) -> float:
    """Wait until ``side``'s servers are back to their idle CPU (or ``max_seconds``); the
    seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < max_seconds:
        before = side.sample()
        time.sleep(1.0)
        if cores_used(before, side.sample()) <= side.idle_cores + SETTLE_MARGIN_CORES:
            break
    waited = time.monotonic() - started
    if waited > 1.5:
        say(f"{side.name}: settled after {waited:.0f}s")
    return waited


def _max_workers(rate: float, timeout: float) -> int:
    """vegeta's most workers in an open-model run: enough connections to keep sending on
    schedule while every request in flight waits up to the client's timeout."""
    return _workers(rate) + math.ceil(rate * (timeout + 1))


def _workers(rate: float) -> int:
    return max(10, math.ceil(rate / 5))


def _answers(summary: dict[str, Any], op: str) -> dict[str, Any]:
    """One operation's outcome in a vegeta summary: what was sent, answered, refused, lost."""
    latency = metric(summary, f"op_{op}_ms")
    accepted = metric(summary, f"op_{op}_ok_ms")
    refused = metric(summary, f"op_{op}_refused_ms")
    kinds = metric(summary, f"op_{op}_answers")
    window = metric(summary, f"op_{op}_window")
    steady = metric(summary, f"op_{op}_window_ms")
    statuses = summary["statuses"].get(op, {})
    sent = int(latency.get("count", 0))
    ok = int(accepted.get("count", 0))
    refusals = int(refused.get("count", 0))
    no_answer = int(kinds.get("no_answer", 0))
    seconds = summary["state"]["testRunDurationMs"] / 1000
    return {
        "sent": sent,
        "ok": ok,
        "refused": refusals,
        "refused_without_retry_after": int(kinds.get("refused_without_retry_after", 0)),
        "timeouts": int(kinds.get("timeouts", 0)),
        "no_answer": no_answer,
        "other_errors": sent - ok - refusals - no_answer,
        "errors": sent - ok,
        "statuses": statuses,
        "goodput": window.get("ok_per_second", ok / seconds if seconds else 0.0),
        "window_s": [window.get("from_s", 0.0), window.get("to_s", seconds)],
        "p50": latency.get("med", 0.0),
        "p95": latency.get("p(95)", 0.0),
        "p99": latency.get("p(99)", 0.0),
        # Requests sent in the steady part (from the warm-up's end; the whole run without
        # a window): what a latency goal at a rate is about.
        "steady_p99": steady.get("p(99)", latency.get("p(99)", 0.0)),
        "steady_count": int(steady.get("count", sent)),
        "accepted_p50": accepted.get("med", 0.0),
        "accepted_p95": accepted.get("p(95)", 0.0),
        "accepted_p99": accepted.get("p(99)", 0.0),
        "refused_p95": refused.get("p(95)", 0.0),
    }


def _with_cpu(
    side: Side, run: Callable[[], dict[str, Any]], served: Callable[[dict[str, Any]], int]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run a load, with the servers' CPU around it: per request sent, and per request
    served once the side's idle CPU over the same time is taken out."""
    before = side.sample()
    summary = run()
    cpu = server_cpu(before, side.sample(), statuses_total(summary))
    done = served(summary)
    net = max(0.0, cpu["cpu_seconds"] - side.idle_cores * cpu["seconds"])
    cpu["served"] = done
    cpu["per_served_ms"] = cpu["cpu_seconds"] * 1000 / done if done else 0.0
    cpu["net_of_idle_per_served_ms"] = net * 1000 / done if done else 0.0
    return summary, cpu


def login_run(
    side: Side, label: str, rate: float, seconds: float, args: argparse.Namespace
) -> dict[str, Any]:
    """Logins alone at ``rate`` (open model) for ``seconds``."""
    total, _ = mix_counts(rate, seconds, 100, refresh=False)
    warmup = min(args.warmup_seconds, seconds / 3)
    summary, cpu = _with_cpu(
        side,
        lambda: attack(
            f"{side.name}-{label}",
            mixed_auth_targets(side.url, side.users, total=total, mix=(100, 0, 0)),
            side.directory,
            duration_s=seconds,
            rate=rate,
            timeout_s=args.client_timeout,
            window=(warmup, seconds),
            workers=_workers(rate),
            max_workers=_max_workers(rate, args.client_timeout),
        ),
        lambda summary: int(metric(summary, "op_login_ok_ms").get("count", 0)),
    )
    return {"offered_rate": rate, "seconds": seconds, **_answers(summary, "login"), "cpu": cpu}


def profile_saturation(side: Side, args: argparse.Namespace) -> dict[str, Any]:
    """Profile reads as fast as ``--profile-connections`` connections get answers."""
    seconds = args.profile_seconds
    summary, cpu = _with_cpu(
        side,
        lambda: attack(
            f"{side.name}-profile-saturation",
            profile_targets(side.url, side.users),
            side.directory,
            duration_s=seconds,
            rate=None,
            workers=args.profile_connections,
            timeout_s=args.client_timeout,
            window=(min(args.warmup_seconds, seconds / 3), seconds),
        ),
        lambda summary: int(metric(summary, "op_profile_ok_ms").get("count", 0)),
    )
    figures = _answers(summary, "profile")
    return {"connections": args.profile_connections, "seconds": seconds, **figures, "cpu": cpu}


def profile_at_rate(side: Side, rate: float, args: argparse.Namespace) -> dict[str, Any]:
    seconds = args.profile_seconds
    summary, cpu = _with_cpu(
        side,
        lambda: attack(
            f"{side.name}-profile-at-rate",
            profile_targets(side.url, side.users),
            side.directory,
            duration_s=seconds,
            rate=rate,
            timeout_s=args.client_timeout,
            window=(min(args.warmup_seconds, seconds / 3), seconds),
            workers=_workers(rate),
            max_workers=_max_workers(rate, args.client_timeout),
        ),
        lambda summary: int(metric(summary, "op_profile_ok_ms").get("count", 0)),
    )
    return {"offered_rate": rate, "seconds": seconds, **_answers(summary, "profile"), "cpu": cpu}


def mix_run(side: Side, args: argparse.Namespace) -> dict[str, Any]:
    """The issue's 70/20/10 (login, register, profile). Without ``make bench``'s refreshes:
    each needs a session of its own opened beforehand (a login each, hundreds at 36/s for
    60 s), which would double the time of the phase for an operation the goal does not name."""
    rate, seconds = args.peer_mix_rate, args.mix_seconds
    total, _ = mix_counts(rate, seconds, MIX[0], refresh=False)
    summary, cpu = _with_cpu(
        side,
        lambda: attack(
            f"{side.name}-mix",
            mixed_auth_targets(side.url, side.users, total=total, mix=MIX),
            side.directory,
            duration_s=seconds,
            rate=rate,
            timeout_s=args.client_timeout,
            workers=_workers(rate),
            max_workers=_max_workers(rate, args.client_timeout),
        ),
        lambda summary: sum(
            int(metric(summary, f"op_{op}_ok_ms").get("count", 0)) for op in MIX_OPS
        ),
    )
    ops = {op: _answers(summary, op) for op in MIX_OPS if op in summary["ops"]}
    return {"offered_rate": rate, "seconds": seconds, "ops": ops, "cpu": cpu}


def node_bcrypt_check(peer_dir: Path | None, cost: int) -> dict[str, float] | None:
    """One bcrypt check by the peer's own hasher (Node ``bcrypt`` from its node_modules)."""
    module = peer_dir / "app" / "node_modules" / "bcrypt" if peer_dir else None
    node = shutil.which("node")
    if module is None or not module.exists() or node is None:
        say("peer's hash check: no node or no node_modules/bcrypt in --peer-dir; not timed")
        return None
    say(f"timing one bcrypt check at cost {cost} with the peer's {module}")
    completed = subprocess.run(
        [node, "-e", NODE_BCRYPT_CHECK, str(module), str(cost), "20"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if completed.returncode != 0:
        say(f"peer's hash check failed: {completed.stderr.strip()[-300:]}")
        return None
    timed: dict[str, float] = json.loads(completed.stdout)
    return {"cost": cost, **timed}


# -- Cake's guards --------------------------------------------------------------------------


async def relay_guard(profile: str, args: argparse.Namespace) -> dict[str, Any]:
    from relay_throughput import measure

    say(f"guard: relay vs raw producer ({args.relay_rows} rows, {args.relay_rounds} rounds)")
    result = await measure(
        profile, rows=args.relay_rows, rounds=args.relay_rounds, rate=200, lag_seconds=3
    )
    return {
        "ratio": result.ratio,
        "rounds": [{"raw": raw, "relay": relay} for raw, relay in result.rounds],
        "rows": args.relay_rows,
    }


async def enrollment_guard(profile: str, args: argparse.Namespace) -> dict[str, Any]:
    from enrollment import Step, goal_met
    from first_login_burst import burst

    users = args.enrollment_users
    say(f"guard: {users} first logins at {ENROLLMENT_RATE:g}/s -> voucher (outbox, relay, Kafka)")
    step = Step("rate-100", users, ENROLLMENT_RATE, users, "P99 login -> voucher < 250 ms")
    result = await burst(profile, users=users, rate=ENROLLMENT_RATE, max_participants=users)
    return {
        **result.as_dict(),
        "p99_ms": result.voucher_ms.get("p99", 0.0),
        "goal_met": goal_met(step, result) and result.correct,
    }


async def _guard(name: str, run: Any) -> dict[str, Any]:
    """A guard that cannot run is a failed goal with its reason, not a lost run."""
    try:
        figures: dict[str, Any] = await run
    except Exception as error:
        say(f"guard {name} failed: {type(error).__name__}: {error}")
        return {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    return figures


# -- the run ------------------------------------------------------------------------------------


def settle_all(sides: list[Side], max_seconds: float) -> None:
    """:func:`settle` every side: they share the box, so one side's phase must not start
    while the other still works off the previous load. (A peer without admission control
    keeps hashing the logins its clients gave up on: in the 13:54 goal run the peer's
    overload backlog, ≈ 15 s of both cores, overlapped Cake's profile saturation, which
    settled only Cake and measured 1,355 reads/s against 1,723/s standalone.)"""
    for side in sides:
        settle(side, max_seconds)


def _both(
    sides: list[Side],
    args: argparse.Namespace,
    phase: str,
    run: Callable[[Side], Any],
    *,
    only: list[Side] | None = None,
) -> None:
    """``run`` the phase on every side (or ``only`` these), each after all sides settled."""
    for side in only if only is not None else sides:
        settle_all(sides, args.settle_seconds)
        say(f"== {side.name}: {phase}")
        side.figures[phase] = run(side)


def _saturation_and_overload(
    sides: list[Side], saturation_rates: dict[str, float], args: argparse.Namespace
) -> dict[str, float]:
    """The login saturation and overload phases of both sides; the overload rates."""
    _both(
        sides,
        args,
        "login saturation",
        lambda side: login_run(
            side, "saturation", saturation_rates[side.name], args.saturation_seconds, args
        ),
    )
    # Overload: each side at 1.5 x its own ceiling (its saturation goodput). Cake's goals are
    # judged at Cake's; the peer, without admission control, keeps hashing abandoned logins
    # after the load ends (minutes of both cores at Cake's rate), which would run into every
    # later phase of both sides.
    cake, peer = sides
    ceiling = cake.figures["login saturation"]["goodput"]
    overload_rate = round(OVERLOAD_FACTOR * ceiling, 1) or 1.0
    peer_ceiling = peer.figures["login saturation"]["goodput"]
    peer_overload_rate = round(OVERLOAD_FACTOR * peer_ceiling, 1) or 1.0
    overload_rates = {"cake": overload_rate, "peer": peer_overload_rate}
    say(
        f"login ceilings: Cake {ceiling:.1f}/s, peer {peer_ceiling:.1f}/s: overload at"
        f" {overload_rate:g}/s and {peer_overload_rate:g}/s"
    )
    _both(
        sides,
        args,
        "overload",
        lambda side: login_run(
            side, "overload", overload_rates[side.name], args.overload_seconds, args
        ),
    )
    return overload_rates


async def goal_mode(
    args: argparse.Namespace, out: Path, stack: Stack, peer_url: str
) -> dict[str, Any]:
    require_raised_limits(stack, args.profile)
    started_at = datetime.now(UTC).isoformat()
    load_start = os.getloadavg()
    peer_dir = Path(args.peer_dir) if args.peer_dir else None
    peer_ports = [int(port) for port in args.peer_ports.split(",") if port]
    peer_pids = [int(pid) for pid in args.peer_pids.split(",") if pid]
    peer_processes = find_peer_processes(peer_url, peer_dir, peer_ports, peer_pids)
    say(f"peer's server processes: {peer_processes.describe() or 'none found'}")
    cake = Side("cake", stack.gateway_url, lambda: sample_server_cpu(stack), out / "cake")
    peer = Side("peer", peer_url, peer_processes.sample, out / "peer")
    sides = [cake, peer]
    for side in sides:
        side.directory.mkdir(parents=True, exist_ok=True)

    auth = stack.service_environment()["auth"]
    cost = int(auth.get("CAKE_AUTH_BCRYPT_COST", "10"))
    hasher = auth.get(
        "CAKE_AUTH_PASSWORD_HASHER", AuthSettings.model_fields["password_hasher"].default
    )
    cake.figures["hash_check"] = {**bcrypt_ceiling(cost, hasher), "hasher": hasher}
    peer.figures["hash_check"] = node_bcrypt_check(peer_dir, cost)
    # Each side is offered 1.2 x its own hash ceiling: above what it can serve, without
    # burying the slower one under a load sized for the faster (a server without admission
    # control serves less the more it is offered). Cake's: its hasher flat out on every core;
    # the peer's: cores ÷ one Node bcrypt check (Cake's when the peer's was not timed).
    saturation_rate = args.saturation_rate or round(
        1.2 * cake.figures["hash_check"]["logins_per_second"]
    )
    peer_check = peer.figures["hash_check"]
    peer_saturation_rate = args.saturation_rate or (
        round(1.2 * (os.cpu_count() or 1) * 1000 / peer_check["check_ms"])
        if peer_check
        else saturation_rate
    )
    saturation_rates = {"cake": saturation_rate, "peer": peer_saturation_rate}

    for side in sides:
        say(f"{side.name}: seeding {args.users} users through {side.url}")
        async with Gateway(side.url) as gateway:
            side.users = await gateway.register_many(args.users, side.name, login_once=True)
    for side in sides:
        settle_all(sides, args.settle_seconds)
        measure_idle(side, args.idle_seconds)
        if side.idle_cores > 0.5:
            say(
                f"WARNING: {side.name}'s servers use {side.idle_cores:.2f} cores with nothing"
                " offered (a stack still catching up?): its figures will be pessimistic"
            )

    _both(
        sides,
        args,
        "logins at the CPU rate",
        lambda side: login_run(side, "cpu", args.cpu_login_rate, args.cpu_seconds, args),
    )
    overload_rates = _saturation_and_overload(sides, saturation_rates, args)
    overload_rate, peer_overload_rate = overload_rates["cake"], overload_rates["peer"]
    _both(sides, args, "profile saturation", lambda side: profile_saturation(side, args))
    peer_reads = peer.figures["profile saturation"]["goodput"]
    read_rate = round(PROFILE_LOAD_FACTOR * peer_reads, 1) or 1.0
    _both(
        sides,
        args,
        "profile reads at 1.5 x the peer's",
        lambda side: profile_at_rate(side, read_rate, args),
        only=[cake],
    )
    _both(sides, args, "mix", lambda side: mix_run(side, args))

    guards: dict[str, Any] = {}
    skip = set(filter(None, args.skip.split(",")))
    if "relay" not in skip:
        settle_all(sides, args.settle_seconds)
        guards["relay"] = await _guard("relay", relay_guard(args.profile, args))
    if "enrollment" not in skip:
        settle_all(sides, args.settle_seconds)
        guards["enrollment"] = await _guard("enrollment", enrollment_guard(args.profile, args))

    result: dict[str, Any] = {
        "mode": "goals",
        "peer_url": peer_url,
        "started_at": started_at,
        "finished_at": datetime.now(UTC).isoformat(),
        "cores": os.cpu_count(),
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "peer_processes": {name: list(pids) for name, pids in peer_processes.roots.items()},
        "settings": {
            "users": args.users,
            "client_timeout_s": args.client_timeout,
            "cpu_login_rate": args.cpu_login_rate,
            "saturation_rate": saturation_rate,
            "peer_saturation_rate": peer_saturation_rate,
            "overload_rate": overload_rate,
            "peer_overload_rate": peer_overload_rate,
            "profile_connections": args.profile_connections,
            "profile_rate": read_rate,
            "mix_rate": args.peer_mix_rate,
            "seconds": {
                "idle": args.idle_seconds,
                "cpu": args.cpu_seconds,
                "saturation": args.saturation_seconds,
                "overload": args.overload_seconds,
                "profile": args.profile_seconds,
                "mix": args.mix_seconds,
                "warmup": args.warmup_seconds,
            },
        },
        "cake": cake.figures,
        "peer": peer.figures,
        "guards": guards,
    }
    result["goals"] = goals(result)
    result["all_met"] = all(goal["verdict"] != "FAIL" for goal in result["goals"])
    return result


async def profile_phase_alone(
    args: argparse.Namespace, out: Path, stack: Stack, peer_reads: float
) -> dict[str, Any]:
    """Only the goal mode's profile-read phase, on Cake alone (no peer): seeded users as in
    the goal mode, idle CPU, saturation with ``--profile-connections`` (closed model), then
    1.5 x ``peer_reads`` (the peer's saturation of a goal run, given) for the P99, each
    measured as :func:`goal_mode` does. For working on the reads between goal runs."""
    require_raised_limits(stack, args.profile)
    load_start = os.getloadavg()
    cake = Side("cake", stack.gateway_url, lambda: sample_server_cpu(stack), out / "cake")
    cake.directory.mkdir(parents=True, exist_ok=True)
    say(f"cake: seeding {args.users} users through {cake.url}")
    async with Gateway(cake.url) as gateway:
        cake.users = await gateway.register_many(args.users, cake.name, login_once=True)
    settle(cake, args.settle_seconds)
    measure_idle(cake, args.idle_seconds)
    read_rate = round(PROFILE_LOAD_FACTOR * peer_reads, 1)
    _both([cake], args, "profile saturation", lambda side: profile_saturation(side, args))
    _both(
        [cake],
        args,
        "profile reads at 1.5 x the peer's",
        lambda side: profile_at_rate(side, read_rate, args),
    )
    saturation = cake.figures["profile saturation"]
    at_rate = cake.figures["profile reads at 1.5 x the peer's"]
    load_end = os.getloadavg()
    say(
        f"profile saturation ({args.profile_connections} connections): "
        f"{saturation['goodput']:,.0f} reads/s (goal >= {PROFILE_VS_PEER * peer_reads:,.0f}),"
        f" p99 {saturation['p99']:.1f} ms, server CPU per read (idle out)"
        f" {saturation['cpu']['net_of_idle_per_served_ms']:.3f} ms"
    )
    say(
        f"at {read_rate:g}/s: p99 {at_rate['steady_p99']:.1f} ms after the warm-up"
        f" (goal < {PROFILE_P99_MS:g}; the whole run: p50 {at_rate['p50']:.1f},"
        f" p99 {at_rate['p99']:.1f} ms), {at_rate['errors']} errors of {at_rate['sent']},"
        f" server CPU per read (idle out) {at_rate['cpu']['net_of_idle_per_served_ms']:.3f} ms"
    )
    say(f"load average (1 min) {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end")
    result = {
        "mode": "profile phase alone",
        "peer_reads_given": peer_reads,
        "load_average": {"start": list(load_start), "end": list(load_end)},
        "cake": cake.figures,
    }
    (out / "profile-phase.json").write_text(json.dumps(result, indent=2))
    return result


# -- the goals ----------------------------------------------------------------------------------


def _goal(
    goal: str,
    unit: str,
    cake: float | None,
    peer: float | None,
    target: str,
    *,
    met: bool | None,
    ratio: float | None = None,
    note: str = "",
) -> dict[str, Any]:
    return {
        "goal": goal,
        "unit": unit,
        "cake": cake,
        "peer": peer,
        "ratio": ratio,
        "target": target,
        "verdict": "info" if met is None else ("PASS" if met else "FAIL"),
        "note": note,
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or not denominator:
        return None
    return numerator / denominator


def _saturation_label(settings: dict[str, Any]) -> str:
    cake_rate = settings["saturation_rate"]
    peer_rate = settings.get("peer_saturation_rate", cake_rate)
    if peer_rate == cake_rate:
        return f"login saturation (goodput at {cake_rate:g}/s offered)"
    return (
        f"login saturation (goodput at {cake_rate:g}/s offered to Cake, {peer_rate:g}/s to the"
        " peer: 1.2 x each one's hash ceiling)"
    )


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every goal of issue 16 against this run's figures (ratio: > 1 means Cake is better:
    Cake ÷ peer for throughput, peer ÷ Cake for latency and cost)."""
    cake, peer, settings = result["cake"], result["peer"], result["settings"]
    out: list[dict[str, Any]] = []

    saturation_c = cake["login saturation"]["goodput"]
    saturation_p = peer["login saturation"]["goodput"]
    out.append(
        _goal(
            _saturation_label(settings),
            "logins/s",
            saturation_c,
            saturation_p,
            f">= {LOGIN_SATURATION_VS_PEER:g} x peer",
            met=saturation_c >= LOGIN_SATURATION_VS_PEER * saturation_p,
            ratio=_ratio(saturation_c, saturation_p),
        )
    )
    hash_c = cake["hash_check"]["cpu_ms"]
    hash_p = (peer.get("hash_check") or {}).get("cpu_ms")
    out.append(
        _goal(
            "one bcrypt check (CPU)",
            "ms",
            hash_c,
            hash_p,
            "-",
            met=None,
            ratio=_ratio(hash_p, hash_c),
            note=f"Cake: {cake['hash_check']['hasher']}; peer: Node bcrypt",
        )
    )
    cpu_rate = settings["cpu_login_rate"]
    per_login_c = cake["logins at the CPU rate"]["cpu"]["net_of_idle_per_served_ms"]
    per_login_p = peer["logins at the CPU rate"]["cpu"]["net_of_idle_per_served_ms"]
    out.append(
        _goal(
            f"server CPU per login at {cpu_rate:g}/s (idle taken out)",
            "ms",
            per_login_c,
            per_login_p if peer["logins at the CPU rate"]["cpu"]["components"] else None,
            f"<= hash check + {CPU_PER_LOGIN_MARGIN_MS:g} ms"
            f" ({hash_c + CPU_PER_LOGIN_MARGIN_MS:.1f})",
            met=per_login_c <= hash_c + CPU_PER_LOGIN_MARGIN_MS,
            ratio=_ratio(per_login_p, per_login_c),
            note=(
                "every server process; idle included: Cake"
                f" {cake['logins at the CPU rate']['cpu']['per_served_ms']:.1f},"
                f" peer {peer['logins at the CPU rate']['cpu']['per_served_ms']:.1f} ms"
            ),
        )
    )

    over_c, over_p = cake["overload"], peer["overload"]
    rate = settings["overload_rate"]
    peer_rate = settings.get("peer_overload_rate", rate)
    rates = (
        f"{rate:g}/s"
        if peer_rate == rate
        else f"1.5 x each one's ceiling ({rate:g}/s and {peer_rate:g}/s)"
    )
    out.append(
        _goal(
            f"overload {rates} for {over_c['seconds']:g}s: goodput",
            "logins/s",
            over_c["goodput"],
            over_p["goodput"],
            f">= {OVERLOAD_GOODPUT_SHARE:g} x Cake's ceiling"
            f" ({OVERLOAD_GOODPUT_SHARE * saturation_c:.1f})",
            met=over_c["goodput"] >= OVERLOAD_GOODPUT_SHARE * saturation_c,
            ratio=_ratio(over_c["goodput"], over_p["goodput"]),
        )
    )
    out.append(
        _goal(
            "overload: p95 of accepted logins",
            "ms",
            over_c["accepted_p95"] if over_c["ok"] else None,
            over_p["accepted_p95"] if over_p["ok"] else None,
            f"< {OVERLOAD_ACCEPTED_P95_MS:g} ms",
            met=over_c["ok"] > 0 and over_c["accepted_p95"] < OVERLOAD_ACCEPTED_P95_MS,
            ratio=_ratio(over_p["accepted_p95"], over_c["accepted_p95"])
            if over_p["ok"] and over_c["ok"]
            else None,
        )
    )
    out.append(
        _goal(
            "overload: refusals' p95 (503/429 + Retry-After)",
            "ms",
            over_c["refused_p95"] if over_c["refused"] else None,
            over_p["refused_p95"] if over_p["refused"] else None,
            f"every failure such a refusal, p95 < {REFUSED_AT_ONCE_P95_MS:g} ms",
            # No refusal at all is fine here when nothing failed (the other rows say whether
            # everything was served in time).
            met=over_c["refused"] == over_c["errors"]
            and over_c["refused_without_retry_after"] == 0
            and (not over_c["refused"] or over_c["refused_p95"] < REFUSED_AT_ONCE_P95_MS),
            note=f"Cake: {_outcome(over_c)}; peer: {_outcome(over_p)}",
        )
    )
    out.append(
        _goal(
            f"overload: client timeouts ({settings['client_timeout_s']:g} s)",
            "requests",
            over_c["timeouts"],
            over_p["timeouts"],
            "0",
            met=over_c["timeouts"] == 0,
        )
    )

    reads_c = cake["profile saturation"]["goodput"]
    reads_p = peer["profile saturation"]["goodput"]
    out.append(
        _goal(
            f"profile reads saturation ({settings['profile_connections']} connections)",
            "reads/s",
            reads_c,
            reads_p,
            f">= {PROFILE_VS_PEER:g} x peer",
            met=reads_c >= PROFILE_VS_PEER * reads_p,
            ratio=_ratio(reads_c, reads_p),
        )
    )
    out.append(
        _goal(
            "server CPU per profile read at saturation (idle out)",
            "ms",
            cake["profile saturation"]["cpu"]["net_of_idle_per_served_ms"],
            peer["profile saturation"]["cpu"]["net_of_idle_per_served_ms"]
            if peer["profile saturation"]["cpu"]["components"]
            else None,
            "-",
            met=None,
            ratio=_ratio(
                peer["profile saturation"]["cpu"]["net_of_idle_per_served_ms"],
                cake["profile saturation"]["cpu"]["net_of_idle_per_served_ms"],
            ),
        )
    )
    at_rate = cake["profile reads at 1.5 x the peer's"]
    out.append(
        _goal(
            f"profile reads p99 at 1.5 x peer's ({settings['profile_rate']:g}/s)",
            "ms",
            at_rate["steady_p99"],
            None,
            f"< {PROFILE_P99_MS:g} ms, 0 errors",
            met=at_rate["errors"] == 0 and at_rate["steady_p99"] < PROFILE_P99_MS,
            note=(
                f"{at_rate['ok']} of {at_rate['sent']} answered 200; p99 of the"
                f" {at_rate['steady_count']} sent from {at_rate['window_s'][0]:g} s on;"
                f" of all, with the warm-up: {at_rate['p99']:.1f} ms"
            ),
        )
    )

    mix_c, mix_p = cake["mix"]["ops"], peer["mix"]["ops"]
    for op in MIX_OPS:
        if op not in mix_c or op not in mix_p:
            continue
        out.append(
            _goal(
                f"mix {settings['mix_rate']:g}/s: {op} p95",
                "ms",
                mix_c[op]["p95"],
                mix_p[op]["p95"],
                "<= peer",
                met=mix_c[op]["p95"] <= mix_p[op]["p95"],
                ratio=_ratio(mix_p[op]["p95"], mix_c[op]["p95"]),
            )
        )
    errors_c = sum(figures["errors"] for figures in mix_c.values())
    errors_p = sum(figures["errors"] for figures in mix_p.values())
    out.append(
        _goal(
            f"mix {settings['mix_rate']:g}/s: errors",
            "requests",
            errors_c,
            errors_p,
            "0",
            met=errors_c == 0,
            note=f"of {sum(f['sent'] for f in mix_c.values())} (Cake) /"
            f" {sum(f['sent'] for f in mix_p.values())} (peer) sent",
        )
    )

    guards = result["guards"]
    relay = guards.get("relay")
    if relay is not None:
        out.append(
            _goal(
                "relay ÷ raw producer (median of rounds)",
                "ratio",
                relay.get("ratio"),
                None,
                f">= {RELAY_VS_RAW:g}",
                met="ratio" in relay and relay["ratio"] >= RELAY_VS_RAW,
                note=relay.get("error", f"{relay.get('rows')} rows a round"),
            )
        )
    enrollment = guards.get("enrollment")
    if enrollment is not None:
        out.append(
            _goal(
                f"first login -> voucher p99 at {ENROLLMENT_RATE:g} logins/s",
                "ms",
                enrollment.get("p99_ms"),
                None,
                f"< {VOUCHER_P99_MS:g} ms, exact vouchers",
                met=bool(enrollment.get("goal_met")),
                note=enrollment.get(
                    "error",
                    f"{enrollment.get('vouchers')}/{enrollment.get('expected_vouchers')} vouchers,"
                    f" writer at {enrollment.get('reached_rate')}/s",
                ),
            )
        )
    return out


def _outcome(figures: dict[str, Any]) -> str:
    return (
        f"{figures['ok']} ok, {figures['refused']} refused"
        f" ({figures['refused_without_retry_after']} without Retry-After),"
        f" {figures['timeouts']} timed out, {figures['other_errors']} other"
        f" of {figures['sent']}"
    )


def write_outputs(result: dict[str, Any], out: Path) -> None:
    (out / "side-by-side.json").write_text(json.dumps(result, indent=2))
    (out / "goals.md").write_text("\n".join(goal_table_lines(result)) + "\n")
    print_goal_table(result)
    say(f"wrote {out / 'side-by-side.json'} and {out / 'goals.md'}")
