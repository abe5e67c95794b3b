"""``make bench-enrollment``: the first-login pipeline's goals, its ceiling and a launch day.

Against the running stack (``make up``), through the whole pipeline (auth outbox → relay →
Kafka → promotions consumer → enrollment and voucher), with ``first_login_burst.burst``:

1. ``rate-100``: 100 logins/s for 10 s, one place each: goal login → voucher P99 < 250 ms;
2. ``rate-500``: 500 logins/s for 10 s, one place each: goal P99 < 1 s;
3. ``sustained-1000``: 1,000 logins/s for 30 s, max 1,000: goal every login decided as it
   comes (the last one within 1 s of being written), exactly 1,000 vouchers, orders 1..1,000;
4. ``ceiling``: 10,000 logins as fast as the writer goes: decisions/s from first to last
   (the enrollment ceiling, unless the writer was the slower one, which it says);
5. ``launch-day``: a campaign with max 1,000 and 5,000 first logins at the highest rate the
   box sustained in steps 3-4 (``--launch-rate`` to choose): vouchers issued, order gaps
   and repeats, P50/P99 login → voucher.

Prints one table and writes ``bench/results/enrollment-<UTC>/enrollment.{json,md}``. Exit 1
when a count is wrong (vouchers, orders, decisions), 2 when the stack cannot be used; with
``--strict`` also 4 when a goal is missed. Run it twice before believing a figure: the box
is shared, and its load average at start and end is in the report.

    uv run python bench/enrollment.py                       # all steps (~2 min)
    uv run python bench/enrollment.py --steps launch-day    # just the launch day
    uv run python bench/enrollment.py --profile test --steps launch-day \\
        --launch-users 60 --launch-max 20 --launch-rate 50  # the smoke test's size
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from first_login_burst import BurstResult, burst, print_result, run_or_explain, writer_warning

RESULTS_DIR = Path(__file__).resolve().parent / "results"
STEPS = ("rate-100", "rate-500", "sustained-1000", "ceiling", "launch-day")
DEFAULT_LAUNCH_RATE = 1000.0
"""Launch-day rate when neither step 3 nor step 4 ran and none is given."""


@dataclass(frozen=True)
class Step:
    name: str
    users: int
    rate: float
    max_participants: int
    goal: str


def plan(args: argparse.Namespace, launch_rate: float) -> dict[str, Step]:
    return {
        "rate-100": Step("rate-100", 1000, 100, 1000, "P99 login -> voucher < 250 ms"),
        "rate-500": Step("rate-500", 5000, 500, 5000, "P99 login -> voucher < 1000 ms"),
        "sustained-1000": Step(
            "sustained-1000",
            30_000,
            1000,
            1000,
            ">= 1000 logins/s for 30 s, each decided as it comes, exactly 1000 vouchers",
        ),
        "ceiling": Step("ceiling", args.ceiling_users, 0, 1000, "(measured: no goal)"),
        "launch-day": Step(
            "launch-day",
            args.launch_users,
            launch_rate,
            args.launch_max,
            f"exactly {min(args.launch_users, args.launch_max)} vouchers, no order gap",
        ),
    }


def goal_met(step: Step, result: BurstResult) -> bool:
    """The step's goal (counts are judged separately, by ``result.correct``)."""
    p99 = result.voucher_ms.get("p99", float("inf"))
    if step.name == "rate-100":
        return result.writer_kept_rate and p99 < 250
    if step.name == "rate-500":
        return result.writer_kept_rate and p99 < 1000
    if step.name == "sustained-1000":
        return result.writer_kept_rate and result.applied_after_last_login_seconds <= 1.0
    return result.correct


def sustained_rate(result: BurstResult) -> float:
    """The rate a run shows the pipeline sustains: what was sent, if the consumer kept up
    with it (the last login decided within 1 s); else what the consumer managed."""
    if result.applied_after_last_login_seconds <= 1.0:
        return result.reached_rate
    return result.consumer_rate


async def run(args: argparse.Namespace) -> list[tuple[Step, BurstResult]]:
    chosen = [name for name in STEPS if name in args.steps.split(",")]
    unknown = set(args.steps.split(",")) - set(STEPS)
    if unknown or not chosen:
        raise SystemExit(f"--steps takes a comma list of {', '.join(STEPS)}")
    done: list[tuple[Step, BurstResult]] = []
    launch_rate = args.launch_rate
    for name in chosen:
        if name == "launch-day" and launch_rate is None:
            measured = [
                sustained_rate(r) for s, r in done if s.name in ("sustained-1000", "ceiling")
            ]
            # 90 % of the best the box showed, so the burst is at a rate it does sustain.
            launch_rate = round(0.9 * max(measured), -1) if measured else DEFAULT_LAUNCH_RATE
        step = plan(args, launch_rate or DEFAULT_LAUNCH_RATE)[name]
        speed = f"{step.rate:g}/s" if step.rate else "full speed"
        print(f"\n== {step.name}: {step.users} logins at {speed}, max {step.max_participants}")
        result = await burst(
            args.profile,
            users=step.users,
            rate=step.rate,
            max_participants=step.max_participants,
            wait_seconds=args.timeout,
        )
        print_result(result)
        done.append((step, result))
    return done


def row(step: Step, result: BurstResult) -> dict[str, Any]:
    voucher = result.voucher_ms
    return {
        "step": step.name,
        "logins": result.users,
        "max": result.max_participants,
        "asked_per_s": result.asked_rate,
        "sent_per_s": result.reached_rate,
        "decided_per_s": result.consumer_rate,
        "last_decided_after_s": result.applied_after_last_login_seconds,
        "vouchers": result.vouchers,
        "expected": result.expected_vouchers,
        "order_gaps": result.order_gaps,
        "order_repeats": result.order_repeats,
        "p50_ms": voucher.get("p50"),
        "p99_ms": voucher.get("p99"),
        "goal": step.goal,
        "goal_met": goal_met(step, result),
        "counts_correct": result.correct,
        "writer_note": writer_warning(result) or ceiling_note(step, result),
    }


def ceiling_note(step: Step, result: BurstResult) -> str | None:
    """The ceiling is the consumer's decisions/s from the first to the last; when the last
    login was decided right after it was written, the writer was the limit: "at least"."""
    if step.name != "ceiling":
        return None
    if result.applied_after_last_login_seconds <= 0.25:
        return (
            f"enrollment ceiling at least {result.consumer_rate:g}/s: the consumer kept up with"
            f" the writer ({result.reached_rate:g}/s), which was the limit"
        )
    return (
        f"enrollment ceiling {result.consumer_rate:g}/s (decisions from first to last; the"
        f" writer sent {result.reached_rate:g}/s and the last login was decided"
        f" {result.applied_after_last_login_seconds} s after it was written)"
    )


def markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    lines = [
        "# First-login enrollment benchmark",
        "",
        f"{header['started_at']} · profile {header['profile']} · {header['cores']} cores ·"
        f" load average {header['load_average_at_start']:.2f} at start,"
        f" {header['load_average_at_end']:.2f} at end (above ~2 the box was busy:"
        " figures measured on a loaded box)",
        "",
        "| step | logins | max | asked/s | sent/s | decided/s | last decided after | vouchers"
        " | order gaps | P50 / P99 login→voucher (ms) | goal | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['logins']} | {r['max']} | {r['asked_per_s'] or 'full speed'} |"
            f" {r['sent_per_s']:g} | {r['decided_per_s']:g} | {r['last_decided_after_s']} s |"
            f" {r['vouchers']}/{r['expected']} | {r['order_gaps']} |"
            f" {r['p50_ms']} / {r['p99_ms']} | {r['goal']} |"
            f" {'yes' if r['goal_met'] and r['counts_correct'] else 'NO'} |"
        )
    notes = [f"- {r['step']}: {r['writer_note']}" for r in rows if r["writer_note"]]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--profile", default="dev", choices=("dev", "test"))
    parser.add_argument(
        "--steps", default=",".join(STEPS), help="comma list of " + ", ".join(STEPS)
    )
    parser.add_argument("--ceiling-users", type=int, default=10_000)
    parser.add_argument("--launch-users", type=int, default=5000)
    parser.add_argument("--launch-max", type=int, default=1000)
    parser.add_argument(
        "--launch-rate", type=float, help="logins/s (default: 90 %% of the best sustained)"
    )
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait per step")
    parser.add_argument("--out", type=Path, help="results directory")
    parser.add_argument("--strict", action="store_true", help="exit 4 when a goal is missed")
    args = parser.parse_args()
    out = args.out or RESULTS_DIR / f"enrollment-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    header: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "profile": args.profile,
        "cores": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
    }
    done: list[tuple[Step, BurstResult]] = run_or_explain(run(args))
    header["load_average_at_end"] = os.getloadavg()[0]
    rows = [row(step, result) for step, result in done]
    out.mkdir(parents=True, exist_ok=True)
    (out / "enrollment.json").write_text(
        json.dumps(
            {**header, "steps": rows, "raw": [result.as_dict() for _, result in done]}, indent=2
        )
    )
    report = markdown(rows, header)
    (out / "enrollment.md").write_text(report)
    print("\n" + report)
    print(f"wrote {out / 'enrollment.json'} and {out / 'enrollment.md'}")
    if not all(r["counts_correct"] for r in rows):
        sys.exit(1)
    if args.strict and not all(r["goal_met"] for r in rows):
        sys.exit(4)


if __name__ == "__main__":
    main()
