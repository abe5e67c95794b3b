"""``make bench``: ceilings, k6 scenarios and a raw gRPC comparison in one run, then a report.

Steps (each prints what it does):

1. check the stack (``--profile dev`` by default; dev needs ``CAKE_GATEWAY_PROFILE=bench make
   up`` for raised per-IP rate limits, the test profile has them);
2. ceilings (``ceilings.py``): bcrypt, grpc.aio echo, Envoy ``direct_response``;
3. seed users through the gateway (registered and logged in once);
4. profile reads: raw gRPC to the auth service (grpc.aio) vs REST through the gateway (k6);
5. ``mixed_auth.js`` at a fixed arrival rate, and a login-only run above the bcrypt ceiling;
6. ``first_login_burst.js`` against a fresh campaign (vouchers counted in the database too);
7. ``topup_contention.js``: the burst's vouchers spent by several racing clients each;
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
    rate_limits_raised,
    run_k6,
    say,
    service_database,
    voucher_counts,
    write_users,
)
from cake.auth.v1 import auth_pb2, auth_pb2_grpc
from cake_devtools.stack import Stack
from ceilings import (
    LoadResult,
    bcrypt_ceiling,
    closed_loop,
    envoy_direct_response_ceiling,
    grpc_echo_ceiling,
    k6_closed_result,
)
from report import print_summary, write_report

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
        "--skip", default="", help="comma list: ceilings,profile,mix,login,burst,topup"
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
    }


async def raw_grpc_profile_reads(
    stack: Stack, tokens: list[str], seconds: float, concurrency: int
) -> LoadResult:
    port = stack.service_environment()["auth"]["CAKE_AUTH_GRPC_PORT"]
    say(f"raw gRPC GetProfile to the auth service :{port}, {concurrency} callers, {seconds:.0f}s")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        counter = iter(range(10**9))

        async def call() -> object:
            token = tokens[next(counter) % len(tokens)]
            return await stub.GetProfile(
                auth_pb2.GetProfileRequest(), metadata=(("authorization", f"Bearer {token}"),)
            )

        return await closed_loop("grpc GetProfile", call, concurrency=concurrency, seconds=seconds)


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
    }
    if not rate_limits_raised(stack):
        # k6 and the seeding run from one IP: at 100 requests/min the figures would be 429s.
        gateway_profile_variable = (
            "CAKE_GATEWAY_PROFILE" if args.profile == "dev" else "CAKE_TEST_GATEWAY_PROFILE"
        )
        raise SystemExit(
            "the gateway runs the default rate limits (100/min per IP); restart it with raised"
            f" ones first: {gateway_profile_variable}=bench"
            f" uv run cake-stack up --profile {args.profile}"
        )
    gateway_url = stack.gateway_url
    duration = f"{args.duration:.0f}s"
    cost = int(stack.service_environment()["auth"].get("CAKE_AUTH_BCRYPT_COST", "10"))

    # 1. ceilings
    bcrypt = bcrypt_ceiling(cost)
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
    k6_env = {"GATEWAY": gateway_url, "USERS_FILE": str(users_file)}

    # 3. profile reads: raw gRPC vs gateway
    if "profile" not in skip:
        raw = await raw_grpc_profile_reads(
            stack, [user.token for user in users], args.duration, args.profile_vus
        )
        results["scenarios"]["profile_grpc_raw"] = raw.as_dict()
        samples = out / "samples-profile_reads.csv"
        summary = run_k6(
            "profile_reads.js",
            {**k6_env, "VUS": str(args.profile_vus), "DURATION": duration},
            out / "k6-profile_reads.json",
            samples_csv=samples,
        )
        results["over_time"]["gateway GET /auth/profile"] = latency_over_time(
            samples, "op_profile_ms"
        )
        rest = k6_closed_result(
            "gateway GET /auth/profile", summary, "op_profile_ms", "op_profile_failed"
        )
        results["scenarios"]["profile_gateway"] = rest.as_dict()

    # 4. the auth mix at a fixed rate, then logins alone above the ceiling
    bcrypt_rate = bcrypt["logins_per_second"]
    if "mix" not in skip:
        rate = args.mix_rate or max(1.0, round(0.7 * bcrypt_rate / 0.9))
        samples = out / "samples-mixed_auth.csv"
        summary = run_k6(
            "mixed_auth.js",
            {**k6_env, "RATE": f"{rate:.0f}", "DURATION": duration},
            out / "k6-mixed_auth.json",
            samples_csv=samples,
        )
        results["over_time"]["mix: login"] = latency_over_time(samples, "op_login_ms")
        results["scenarios"]["mixed_auth"] = {
            "target_rate": rate,
            "dropped_iterations": metric(summary, "dropped_iterations").get("count", 0.0),
            **{op: mix_result(summary, op) for op in ("login", "register", "profile", "refresh")},
        }
    if "login" not in skip:
        # Above the ceiling: the most logins/s; at 0.85 x ceiling: the latency at the goal rate.
        for key, factor in (("login_saturation", 1.3), ("login_at_goal", 0.85)):
            rate = round(factor * bcrypt_rate)
            summary = run_k6(
                "mixed_auth.js",
                {**k6_env, "RATE": str(rate), "DURATION": duration, "MIX": "100/0/0"},
                out / f"k6-{key}.json",
            )
            results["scenarios"][key] = {
                "offered_rate": rate,
                "dropped_iterations": metric(summary, "dropped_iterations").get("count", 0.0),
                **mix_result(summary, "login"),
            }

    # 5. first-login burst, 6. top-up contention on its vouchers
    if "burst" not in skip:
        results["scenarios"]["first_login_burst"] = await first_login_burst(
            args, stack, out, gateway_url, run_topup="topup" not in skip
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
                summary = run_k6(
                    "first_login_burst.js",
                    {
                        "GATEWAY": gateway_url,
                        "USERS_FILE": str(users_file),
                        "POLL_TIMEOUT": f"{args.poll_timeout:g}",
                    },
                    out / "k6-first_login_burst.json",
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
    summary = run_k6(
        "topup_contention.js",
        {
            "GATEWAY": str(gateway.client.base_url).rstrip("/"),
            "USERS_FILE": str(topup_file),
            "RACERS": str(args.racers),
        },
        out / "k6-topup_contention.json",
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
        "k6_thresholds_passed": summary["k6_exit_code"] == 0,
        "correct": max(per_voucher.values(), default=0) <= 1,
        "p50": latency.get("med", 0.0),
        "p95": latency.get("p(95)", 0.0),
        "p99": latency.get("p(99)", 0.0),
    }


def main() -> None:
    args = _arguments()
    out = args.out or RESULTS_DIR / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    say(f"results in {out}")
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
