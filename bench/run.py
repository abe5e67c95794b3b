"""``make bench``: ceilings, load scenarios (vegeta, ``loadgen.py``; flows in ``scenarios.py``)
and a raw gRPC comparison in one run, then a report.

Steps (each prints what it does):

1. check the stack (``--profile dev`` by default; dev needs ``CAKE_GATEWAY_PROFILE=bench make
   up`` for raised per-IP rate limits, the test profile has them);
2. ceilings (``ceilings.py``): bcrypt, grpc.aio echo, Envoy ``direct_response``;
3. seed users through the gateway (registered and logged in once);
4. profile reads: raw gRPC to the auth service (grpc.aio) vs REST through the gateway
   (vegeta, closed model);
5. the auth mix at a fixed arrival rate (vegeta, open model), and login-only runs above and
   below the bcrypt ceiling;
6. the first-login burst against a fresh campaign (vouchers counted in the database too);
7. top-up contention: the burst's vouchers spent by several racing clients each;
8. ``bench/results/<timestamp>/{results.json,report.md}`` and a one-screen summary.

Usage::

    uv run python bench/run.py                      # dev stack, short default durations
    uv run python bench/run.py --profile test --duration 10 --burst-users 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa
from benchlib import (
    RESULTS_DIR,
    Gateway,
    admin_token_via_cli,
    check_stack,
    latency_over_time,
    metric,
    require_raised_limits,
    sample_server_cpu,
    say,
    server_cpu,
    service_database,
    statuses_total,
    voucher_counts,
    write_users,
)
from cake.auth.v1 import auth_pb2, auth_pb2_grpc
from cake_auth.settings import AuthSettings
from cake_devtools.stack import Stack
from ceilings import (
    LoadResult,
    bcrypt_ceiling,
    closed_loop,
    envoy_direct_response_ceiling,
    grpc_echo_ceiling,
    vegeta_closed_result,
)
from loadgen import attack
from report import print_summary, write_report
from scenarios import (
    first_login_burst_clients,
    mix_counts,
    mixed_auth_targets,
    profile_targets,
    sessions_for_refresh,
    topup_race,
)
from side_by_side import (
    NOT_MET_EXIT,
    goal_mode,
    probe_peer,
    profile_phase_alone,
    write_outputs,
)

MIX = (70.0, 20.0, 10.0)
"""The Cake System's auth mix: login / register / profile shares (%)."""

NESTJS_REFERENCE = {
    "login_per_second": 34.6,
    "profile_per_second": 800.0,
    "profile_p95_ms": 241.0,
    "mix_per_second": 36.0,
    "mix_login_p95_ms": 103.0,
}


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="dev", choices=["dev", "test"])
    parser.add_argument("--duration", type=float, default=15, help="seconds per timed scenario")
    parser.add_argument("--ceiling-seconds", type=float, default=5)
    parser.add_argument("--users", type=int, default=60, help="seeded users for mix/profile")
    parser.add_argument(
        "--peer-url",
        help="goal mode: the same loads against Cake and this peer (its base URL, the Cake "
        "System's REST API), one table of the goals, exit 4 when one is not met",
    )
    peer = parser.add_argument_group("goal mode (--peer-url; bench/side_by_side.py)")
    peer.add_argument(
        "--peer-dir",
        default="/tmp/cake-peer",  # noqa: S108 - the peer script's work folder, read only
        help="the peer's work folder: its pid files and app/.env ports name its server "
        "processes, node_modules/bcrypt times its hash check ('' for none)",
    )
    peer.add_argument("--peer-ports", default="", help="more ports the peer's servers listen on")
    peer.add_argument("--peer-pids", default="", help="more peer server pids (with descendants)")
    peer.add_argument("--client-timeout", type=float, default=10, help="seconds per request")
    peer.add_argument("--idle-seconds", type=float, default=5, help="idle CPU baseline")
    peer.add_argument("--settle-seconds", type=float, default=60, help="most wait for idle")
    peer.add_argument("--warmup-seconds", type=float, default=5, help="left out of goodputs")
    peer.add_argument("--cpu-login-rate", type=float, default=20, help="logins/s for CPU/login")
    peer.add_argument("--cpu-seconds", type=float, default=15)
    peer.add_argument(
        "--saturation-rate", type=float, help="logins/s offered (default 1.2 x bcrypt ceiling)"
    )
    peer.add_argument("--saturation-seconds", type=float, default=20)
    peer.add_argument("--overload-seconds", type=float, default=60)
    peer.add_argument("--profile-connections", type=int, default=64)
    peer.add_argument("--profile-seconds", type=float, default=15)
    parser.add_argument(
        "--profile-phase-alone",
        type=float,
        metavar="PEER_READS",
        help="only the goal mode's profile-read phase, on Cake alone (no peer): saturation, "
        "then 1.5 x PEER_READS (a peer's saturation from a goal run) for the P99",
    )
    peer.add_argument("--peer-mix-rate", type=float, default=36, help="mix iterations/s")
    peer.add_argument("--mix-seconds", type=float, default=60)
    peer.add_argument("--relay-rows", type=int, default=50_000)
    peer.add_argument("--relay-rounds", type=int, default=3)
    peer.add_argument("--enrollment-users", type=int, default=1000, help="first logins at 100/s")
    parser.add_argument("--mix-rate", type=float, help="mix iterations/s (default: 0.7 x ceiling)")
    parser.add_argument("--profile-vus", type=int, default=16)
    parser.add_argument("--burst-users", type=int, default=60)
    parser.add_argument("--burst-max", type=int, default=50, help="campaign maxParticipants")
    parser.add_argument("--out", type=Path, help="results directory (default: bench/results/<ts>)")
    parser.add_argument("--racers", type=int, default=3, help="clients per voucher (top-up)")
    parser.add_argument(
        "--poll-timeout", type=float, default=10, help="burst: seconds a client waits for a voucher"
    )
    parser.add_argument(
        "--skip",
        default="",
        help="comma list: ceilings,profile,mix,login,burst,topup; goal mode: relay,enrollment",
    )
    return parser.parse_args()


def mix_result(summary: dict[str, Any], op: str) -> dict[str, float]:
    latency = metric(summary, f"op_{op}_ms")
    duration_s = summary["state"]["testRunDurationMs"] / 1000
    count = latency.get("count", 0.0)
    return {
        "count": count,
        "rate": count / duration_s if duration_s else 0.0,
        "ok_rate": metric(summary, "op_ok").get("rate", 0.0),
        "p50": latency.get("med", 0.0),
        "p95": latency.get("p(95)", 0.0),
        "p99": latency.get("p(99)", 0.0),
        "error_rate": metric(summary, f"op_{op}_failed").get("rate", 0.0),
        "ok_p95": metric(summary, f"op_{op}_ok_ms").get("p(95)", 0.0),
        "refused": metric(summary, f"op_{op}_refused_ms").get("count", 0.0),
        "refused_p95": metric(summary, f"op_{op}_refused_ms").get("p(95)", 0.0),
        # Goodput: the answers that succeeded (refusals and errors are in ``count``).
        "ok_per_second": (
            count * (1 - metric(summary, f"op_{op}_failed").get("rate", 0.0)) / duration_s
            if duration_s
            else 0.0
        ),
    }


async def raw_grpc_profile_reads(
    stack: Stack, tokens: list[str], seconds: float, concurrency: int
) -> LoadResult:
    environment = stack.service_environment()["auth"]
    targets = [f"127.0.0.1:{environment['CAKE_AUTH_GRPC_PORT']}"]
    if "CAKE_AUTH_WORKER_SOCKET_DIR" in environment:
        # Several worker processes: every one of them, as the gateway spreads requests.
        socket_dir = Path(environment["CAKE_AUTH_WORKER_SOCKET_DIR"])
        workers = int(environment["CAKE_AUTH_WORKERS"])
        targets = [f"unix:{socket_dir / f'auth-{index}.sock'}" for index in range(workers)]
    say(f"raw gRPC GetProfile to the auth service {targets}, {concurrency} callers, {seconds:.0f}s")
    channels = [grpc.aio.insecure_channel(target) for target in targets]
    try:
        stubs = [auth_pb2_grpc.AuthServiceStub(channel) for channel in channels]
        counter = iter(range(10**9))

        async def call() -> object:
            index = next(counter)
            token = tokens[index % len(tokens)]
            return await stubs[index % len(stubs)].GetProfile(
                auth_pb2.GetProfileRequest(), metadata=(("authorization", f"Bearer {token}"),)
            )

        return await closed_loop("grpc GetProfile", call, concurrency=concurrency, seconds=seconds)
    finally:
        await asyncio.gather(*(channel.close(None) for channel in channels))


async def mixed_auth(
    args: argparse.Namespace, out: Path, stack: Stack, users: list[Any], rate: float
) -> tuple[dict[str, Any], list[dict[str, float]], dict[str, Any]]:
    """The auth mix at ``rate`` (open model): its figures, its login latency over time and
    the servers' CPU per request."""
    gateway_url = stack.gateway_url
    samples = out / "samples-mixed_auth.csv"
    total, refreshes = mix_counts(rate, args.duration, MIX[0], refresh=True)
    say(f"opening {refreshes} sessions for the mix's refreshes")
    async with Gateway(gateway_url) as gateway:
        refresh_tokens = await sessions_for_refresh(gateway, users, refreshes)
    before = sample_server_cpu(stack)
    summary = attack(
        "mixed_auth",
        mixed_auth_targets(gateway_url, users, total=total, mix=MIX, refresh_tokens=refresh_tokens),
        out,
        duration_s=args.duration,
        rate=rate,
        workers=max(10, round(rate * 2)),
        samples_csv=samples,
    )
    after = sample_server_cpu(stack)
    over_time = latency_over_time(samples, "op_login_ms")
    figures = {op: mix_result(summary, op) for op in ("login", "register", "profile", "refresh")}
    cpu = server_cpu(
        before,
        after,
        statuses_total(summary),
        rate=sum(figure["rate"] for figure in figures.values()),
        p99=figures["login"]["p99"],
    )
    return {"target_rate": rate, "statuses": summary["statuses"], **figures}, over_time, cpu


async def profile_reads(
    args: argparse.Namespace, out: Path, stack: Stack, users: list[Any], results: dict[str, Any]
) -> None:
    """Profile reads, raw gRPC to auth then REST through the gateway, with the servers' CPU."""
    gateway_url = stack.gateway_url
    cpu_by_scenario = results["server_cpu"]
    before = sample_server_cpu(stack)
    raw = await raw_grpc_profile_reads(
        stack, [user.token for user in users], args.duration, args.profile_vus
    )
    results["scenarios"]["profile_grpc_raw"] = raw.as_dict()
    cpu_by_scenario["profile_grpc_raw"] = server_cpu(
        before, sample_server_cpu(stack), raw.count, rate=raw.rate, p99=raw.p99
    )
    samples = out / "samples-profile_reads.csv"
    before = sample_server_cpu(stack)
    summary = attack(
        "profile_reads",
        profile_targets(gateway_url, users),
        out,
        duration_s=args.duration,
        rate=None,
        workers=args.profile_vus,
        samples_csv=samples,
    )
    results["over_time"]["gateway GET /auth/profile"] = latency_over_time(samples, "op_profile_ms")
    rest = vegeta_closed_result(
        "gateway GET /auth/profile", summary, "op_profile_ms", "op_profile_failed"
    )
    results["scenarios"]["profile_gateway"] = rest.as_dict()
    cpu_by_scenario["profile_gateway"] = server_cpu(
        before,
        sample_server_cpu(stack),
        statuses_total(summary),
        rate=rest.rate,
        p99=rest.p99,
    )


async def bench(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    stack = Stack(args.profile, echo=None)
    skip = set(filter(None, args.skip.split(",")))
    check_stack(stack)
    results: dict[str, Any] = {
        "profile": args.profile,
        "started_at": datetime.now(UTC).isoformat(),
        "cores": os.cpu_count(),
        # The box is shared: a busy machine explains bad figures better than the code does.
        "load_average_at_start": os.getloadavg()[0],
        "nestjs_reference": NESTJS_REFERENCE,
        "ceilings": {},
        "scenarios": {},
        "over_time": {},
        # CPU per request of every server process, per scenario (benchlib.server_cpu).
        "server_cpu": {},
    }
    require_raised_limits(stack, args.profile)
    gateway_url = stack.gateway_url
    cost = int(stack.service_environment()["auth"].get("CAKE_AUTH_BCRYPT_COST", "10"))

    # 1. ceilings
    hasher = stack.service_environment()["auth"].get(
        "CAKE_AUTH_PASSWORD_HASHER", AuthSettings.model_fields["password_hasher"].default
    )
    bcrypt = bcrypt_ceiling(cost, hasher)
    results["ceilings"]["bcrypt"] = bcrypt
    if "ceilings" not in skip:
        echo = await grpc_echo_ceiling(args.ceiling_seconds)
        results["ceilings"]["grpc_echo"] = echo.as_dict()
        envoy = envoy_direct_response_ceiling(out, args.ceiling_seconds)
        results["ceilings"]["envoy_direct_response"] = envoy.as_dict()

    # 2. seed
    say(f"seeding {args.users} users through {gateway_url} (register + one login each)")
    started = time.monotonic()
    async with Gateway(gateway_url) as gateway:
        users = await gateway.register_many(args.users, "seed", login_once=True)
    say(f"seeded {len(users)} users in {time.monotonic() - started:.1f}s")
    users_file = out / "users-seeded.json"
    write_users(users_file, users)

    # 3. profile reads: raw gRPC vs gateway
    cpu_by_scenario = results["server_cpu"]
    if "profile" not in skip:
        await profile_reads(args, out, stack, users, results)

    # 4. the auth mix at a fixed rate, then logins alone above the ceiling
    bcrypt_rate = bcrypt["one_at_a_time_per_second"]
    if "mix" not in skip:
        rate = args.mix_rate or max(1.0, round(0.7 * bcrypt_rate / 0.9))
        (
            results["scenarios"]["mixed_auth"],
            results["over_time"]["mix: login"],
            cpu_by_scenario["mixed_auth"],
        ) = await mixed_auth(args, out, stack, users, rate)
    if "login" not in skip:
        # Above the ceiling: the most logins/s; at 0.85 x ceiling: the latency at the goal rate.
        for key, factor in (("login_saturation", 1.3), ("login_at_goal", 0.85)):
            rate = round(factor * bcrypt_rate)
            total, _ = mix_counts(rate, args.duration, 100, refresh=False)
            before = sample_server_cpu(stack)
            summary = attack(
                key,
                mixed_auth_targets(gateway_url, users, total=total, mix=(100, 0, 0)),
                out,
                duration_s=args.duration,
                rate=rate,
                workers=max(10, rate * 2),
            )
            results["scenarios"][key] = {
                "offered_rate": rate,
                "statuses": summary["statuses"],
                **mix_result(summary, "login"),
            }
            cpu_by_scenario[key] = server_cpu(
                before,
                sample_server_cpu(stack),
                statuses_total(summary),
                rate=results["scenarios"][key]["rate"],
                p99=results["scenarios"][key]["p99"],
            )

    # 5. first-login burst, 6. top-up contention on its vouchers
    if "burst" not in skip:
        before = sample_server_cpu(stack)
        results["scenarios"]["first_login_burst"] = burst = await first_login_burst(
            args, stack, out, gateway_url, run_topup="topup" not in skip
        )
        # Per first login; the burst's polls, the seeding and the top-up race are in it too.
        cpu_by_scenario["first_login_burst (+ top-ups)"] = server_cpu(
            before, sample_server_cpu(stack), burst["users"], p99=burst["login_p99"]
        )
    results["finished_at"] = datetime.now(UTC).isoformat()
    results["load_average_at_end"] = os.getloadavg()[0]
    return results


async def first_login_burst(
    args: argparse.Namespace, stack: Stack, out: Path, gateway_url: str, *, run_topup: bool
) -> dict[str, Any]:
    say("admin token (cake-auth create-admin + login)")
    admin = admin_token_via_cli(stack, gateway_url)
    promotions = service_database(stack, "promotions")
    try:
        async with Gateway(gateway_url) as gateway:
            say(f"registering {args.burst_users} burst users (no login yet)")
            users = await gateway.register_many(args.burst_users, "burst", login_once=False)
            campaign = await gateway.create_campaign(
                admin, args.burst_max, f"bench burst {datetime.now(UTC):%H:%M:%S}"
            )
            say(f"campaign {campaign} (maxParticipants {args.burst_max}) active")
            users_file = out / "users-burst.json"
            write_users(users_file, users)
            try:
                say(f"first-login burst: {len(users)} clients log in at once, then poll")
                summary = await first_login_burst_clients(
                    gateway_url, users, poll_ms=50, poll_timeout=args.poll_timeout
                )
                await asyncio.sleep(1)
                vouchers, holders = await voucher_counts(promotions, campaign)
            finally:
                await gateway.end_campaign(admin, campaign)
            expected = min(args.burst_users, args.burst_max)
            lag = metric(summary, "login_to_voucher_ms")
            login = metric(summary, "op_login_ms")
            burst: dict[str, Any] = {
                "users": args.burst_users,
                "max_participants": args.burst_max,
                "expected_vouchers": expected,
                "vouchers_in_database": vouchers,
                "users_with_voucher": holders,
                "vouchers_seen_by_clients": metric(summary, "vouchers_seen").get("count", 0),
                "doubled": vouchers - holders,
                "correct": vouchers == expected and holders == expected,
                "login_failed_rate": metric(summary, "op_login_failed").get("rate", 0.0),
                "logins_sent_again_after_503": metric(summary, "logins_sent_again_after_503").get(
                    "count", 0
                ),
                "login_p50": login.get("med", 0.0),
                "login_p99": login.get("p(99)", 0.0),
                "lag_p50": lag.get("med", 0.0),
                "lag_p95": lag.get("p(95)", 0.0),
                "lag_p99": lag.get("p(99)", 0.0),
                "lag_note": "client-side: login answer -> first my-vouchers poll that sees it"
                " (50 ms polls)",
            }
            say(f"burst: {vouchers} vouchers for {holders} users, expected {expected}")
            if run_topup:
                burst["topup"] = await topup_contention(args, gateway, promotions, users, out)
    finally:
        await promotions.dispose()
    return burst


async def topup_contention(
    args: argparse.Namespace, gateway: Gateway, promotions: Any, users: list[Any], out: Path
) -> dict[str, Any]:
    say("collecting the burst users' vouchers for the top-up race")
    holders: list[dict[str, str]] = []
    for user in users:
        response = await gateway.call("GET", "/promotions/my-vouchers", token=user.token)
        vouchers = response.json() if response.status_code == 200 else []
        if vouchers:
            holders.append(
                {"token": user.token, "phone": user.phone, "voucher": vouchers[0]["code"]}
            )
    topup_file = out / "users-topup.json"
    topup_file.write_text(json.dumps({"users": holders}))
    say(f"top-up race: {len(holders)} vouchers, {args.racers} racing clients each")
    summary = await topup_race(
        str(gateway.client.base_url).rstrip("/"), holders, racers=args.racers
    )
    codes = [holder["voucher"] for holder in holders]
    async with promotions.connect() as connection:
        rows = (
            await connection.execute(
                sa.text(
                    "SELECT v.code, count(t.id) FROM vouchers v LEFT JOIN topups t"
                    " ON t.voucher_id = v.id WHERE v.code = ANY(:codes) GROUP BY v.code"
                ),
                {"codes": codes},
            )
        ).all()
    per_voucher = {str(code): int(count) for code, count in rows}
    latency = metric(summary, "op_topup_ms")
    return {
        "vouchers": len(codes),
        "racers_per_voucher": args.racers,
        "attempts": len(codes) * args.racers,
        "succeeded": metric(summary, "topup_ok").get("count", 0),
        "rejected": metric(summary, "topup_rejected").get("count", 0),
        "errors": metric(summary, "topup_errors").get("count", 0),
        "max_topups_per_voucher_db": max(per_voucher.values(), default=0),
        "vouchers_spent_db": sum(1 for count in per_voucher.values() if count > 0),
        "clients_saw_at_most_one_success_per_voucher": summary["at_most_one_ok_per_voucher"],
        "correct": max(per_voucher.values(), default=0) <= 1,
        "p50": latency.get("med", 0.0),
        "p95": latency.get("p(95)", 0.0),
        "p99": latency.get("p(99)", 0.0),
    }


def main() -> None:
    args = _arguments()
    if args.peer_url:
        # Before anything else: a peer that does not answer ends the run at once.
        probe_peer(args.peer_url.rstrip("/"))
    out = args.out or RESULTS_DIR / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    say(f"results in {out}")
    if args.profile_phase_alone:
        stack = Stack(args.profile, echo=None)
        check_stack(stack)
        asyncio.run(profile_phase_alone(args, out, stack, args.profile_phase_alone))
        return
    if args.peer_url:
        stack = Stack(args.profile, echo=None)
        check_stack(stack)
        result = asyncio.run(goal_mode(args, out, stack, args.peer_url.rstrip("/")))
        write_outputs(result, out)
        if not result["all_met"]:
            sys.exit(NOT_MET_EXIT)
        return
    results = asyncio.run(bench(args, out))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    report = write_report(results, out / "report.md")
    say(f"wrote {out / 'results.json'} and {report}")
    print_summary(results)
    burst = results["scenarios"].get("first_login_burst", {})
    if burst and (not burst["correct"] or not burst.get("topup", {"correct": True})["correct"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
