"""Turn ``results.json`` into ``report.md`` (+ two SVG bar charts) and a one-screen summary.

No plotting library: the charts are hand-written SVG files next to the report, and the same
bars are drawn in ASCII inside the Markdown so the report reads anywhere.

Re-render an old run: ``uv run python bench/report.py bench/results/<timestamp>/results.json``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Row:
    """One measured figure with its denominator (a ceiling, or the raw path)."""

    name: str
    rate: float
    ceiling_name: str
    ceiling: float
    p50: float
    p95: float
    p99: float
    error_rate: float
    goal: str

    @property
    def ratio(self) -> float:
        return self.rate / self.ceiling if self.ceiling else 0.0


def measured(
    figure: str,
    scenario: dict[str, Any],
    ceiling_name: str,
    ceiling: float,
    goal: str,
    *,
    rate: float | None = None,
) -> Row:
    """A row for a scenario's measured latencies and errors (rate: its own unless given)."""
    return Row(
        figure,
        scenario["rate"] if rate is None else rate,
        ceiling_name,
        ceiling,
        scenario["p50"],
        scenario["p95"],
        scenario["p99"],
        scenario["error_rate"],
        goal,
    )


def rows(results: dict[str, Any]) -> list[Row]:
    ceilings = results["ceilings"]
    scenarios = results["scenarios"]
    bcrypt = ceilings["bcrypt"]["logins_per_second"]
    out: list[Row] = []
    echo = ceilings.get("grpc_echo")
    envoy = ceilings.get("envoy_direct_response")
    raw = scenarios.get("profile_grpc_raw")
    if raw:
        out.append(
            measured(
                "profile reads, raw gRPC",
                raw,
                "grpc echo",
                echo["rate"] if echo else 0.0,
                "service cost alone",
            )
        )
    rest = scenarios.get("profile_gateway")
    if rest:
        out.append(
            measured(
                "profile reads, gateway REST",
                rest,
                "raw gRPC reads",
                raw["rate"] if raw else 0.0,
                ">= 0.7 x raw; >= 1600/s, p95 < 50 ms (2 x NestJS)",
            )
        )
        if envoy:
            out.append(
                measured(
                    "profile reads, gateway (vs envoy)",
                    rest,
                    "envoy direct_response",
                    envoy["rate"],
                    "gateway share",
                )
            )
    login = scenarios.get("login_saturation")
    if login:
        out.append(
            measured(
                "logins alone (offered 1.3 x ceiling)",
                login,
                "bcrypt ceiling",
                bcrypt,
                ">= 0.85 x ceiling, p95 < 1 s; NestJS 34.6/s",
                rate=login["rate"] * (1 - login["error_rate"]),
            )
        )
    at_goal = scenarios.get("login_at_goal")
    if at_goal:
        out.append(
            measured(
                f"logins alone at {at_goal['offered_rate']:.0f}/s (0.85 x ceiling)",
                at_goal,
                "bcrypt ceiling",
                bcrypt,
                "P95 < 1 s, 0 errors",
                rate=at_goal["rate"] * (1 - at_goal["error_rate"]),
            )
        )
    mix = scenarios.get("mixed_auth")
    if mix:
        done = sum(mix[op]["rate"] for op in ("login", "register", "profile"))
        out.append(
            Row(
                f"mix 70/20/10: all (offered {mix['target_rate']:.0f}/s)",
                done,
                "offered rate",
                mix["target_rate"],
                0.0,
                0.0,
                0.0,
                max(mix[op]["error_rate"] for op in ("login", "register", "profile")),
                "0 errors below the ceiling; NestJS saturates at 36/s",
            )
        )
        for op, goal in (
            ("login", "NestJS mix login p95 103 ms"),
            ("register", ""),
            ("profile", ""),
            ("refresh", ""),
        ):
            out.append(measured(f"mix: {op}", mix[op], "-", 0.0, goal))
    return out


def log_fraction(value: float, top: float) -> float:
    """Where ``value`` sits between 1 ms and ``top`` on a log axis (0..1)."""
    return math.log10(1 + value) / math.log10(1 + top) if top > 0 else 0.0


def ascii_bar(fraction: float, width: int = 30) -> str:
    filled = max(0, min(width, round(fraction * width)))
    return "#" * filled + "." * (width - filled)


def svg_bars(title: str, bars: list[tuple[str, float, str]], maximum: float) -> str:
    """Horizontal bars: (label, value, text shown after the bar)."""
    height = 40 + 26 * len(bars)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="760" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<text x="10" y="20" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    for index, (label, value, text) in enumerate(bars):
        y = 34 + 26 * index
        width = 0 if maximum <= 0 else max(1, round(360 * min(value, maximum) / maximum))
        parts.append(f'<text x="10" y="{y + 14}">{escape(label)}</text>')
        parts.append(f'<rect x="290" y="{y}" width="{width}" height="18" fill="#4a7bd0"/>')
        parts.append(f'<text x="{296 + width}" y="{y + 14}">{escape(text)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def svg_lines(title: str, series: list[dict[str, float]]) -> str:
    """P50/P95/P99 per second as three polylines (linear ms axis from 0 to the worst P99)."""
    width, height, left, top_margin, bottom = 760, 260, 60, 30, 30
    plot_w, plot_h = width - left - 20, height - top_margin - bottom
    worst = max((point["p99"] for point in series), default=1.0) or 1.0
    last = max((point["second"] for point in series), default=1.0) or 1.0

    def xy(point: dict[str, float], key: str) -> str:
        x = left + plot_w * point["second"] / last
        y = top_margin + plot_h * (1 - point[key] / worst)
        return f"{x:.1f},{y:.1f}"

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<text x="10" y="18" font-size="14" font-weight="bold">{escape(title)}</text>',
        f'<line x1="{left}" y1="{top_margin + plot_h}" x2="{left + plot_w}"'
        f' y2="{top_margin + plot_h}" stroke="#999"/>',
        f'<line x1="{left}" y1="{top_margin}" x2="{left}" y2="{top_margin + plot_h}"'
        ' stroke="#999"/>',
        f'<text x="4" y="{top_margin + 10}">{worst:.0f} ms</text>',
        f'<text x="4" y="{top_margin + plot_h}">0</text>',
        f'<text x="{left + plot_w - 40}" y="{height - 8}">{last:.0f} s</text>',
    ]
    for key, colour in (("p50", "#2b8a3e"), ("p95", "#e8590c"), ("p99", "#c92a2a")):
        points = " ".join(xy(point, key) for point in series)
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>'
        )
        index = ("p50", "p95", "p99").index(key)
        parts.append(
            f'<text x="{left + 10 + 60 * index}" y="{height - 8}" fill="{colour}">{key}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def over_time_lines(results: dict[str, Any], directory: Path) -> list[str]:
    lines: list[str] = []
    for index, (name, series) in enumerate(results.get("over_time", {}).items()):
        if not series:
            continue
        chart = f"over-time-{index}.svg"
        (directory / chart).write_text(svg_lines(f"{name}: latency per second", series))
        lines += [
            f"### {name}",
            "",
            f"![{name} over time]({chart})",
            "",
            "```",
            "  s      n     p50 ms     p95 ms     p99 ms",
        ]
        lines += [
            f"{point['second']:>3.0f} {point['count']:>6.0f} {point['p50']:>10.1f}"
            f" {point['p95']:>10.1f} {point['p99']:>10.1f}"
            for point in series
        ]
        lines += ["```", ""]
    return ["## Latency over time", "", *lines] if lines else []


def write_report(results: dict[str, Any], path: Path) -> Path:
    table = rows(results)
    lines = [
        f"# Cake benchmark — {results['started_at'][:19]}Z, profile `{results['profile']}`,"
        f" {results['cores']} cores",
        "",
        f"1-minute load average: {results.get('load_average_at_start', 0):.2f} at start,"
        f" {results.get('load_average_at_end', 0):.2f} at end (above ~{results['cores']}, other"
        " work on the box skews every figure).",
        "",
    ]
    if results.get("warning"):
        lines += [f"**Warning:** {results['warning']}", ""]
    ceilings = results["ceilings"]
    bcrypt = ceilings["bcrypt"]
    lines += [
        "## Ceilings (measured in this run)",
        "",
        "| ceiling | per second | P50 ms | P95 ms | P99 ms |",
        "|---|---:|---:|---:|---:|",
        f"| bcrypt: the auth service's hasher flat out on {bcrypt['cores']} cores (one check"
        f" alone {bcrypt['check_ms']:.1f} ms, cost {bcrypt['cost']})"
        f" | {bcrypt['logins_per_second']:.1f} | | | |",
    ]
    for key in ("grpc_echo", "envoy_direct_response"):
        if key in ceilings:
            c = ceilings[key]
            lines.append(
                f"| {c['name']} | {c['rate']:.0f} | {c['p50']:.1f} | {c['p95']:.1f} |"
                f" {c['p99']:.1f} |"
            )
    lines += [
        "",
        "## Scenarios",
        "",
        "| figure | per second | ÷ ceiling | ratio | P50 ms | P95 ms | P99 ms | errors | goal |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in table:
        ratio = f"{row.ratio:.2f}" if row.ceiling else ""
        latency = f"{row.p50:.1f} | {row.p95:.1f} | {row.p99:.1f}" if row.p99 > 0 else " |  | "
        lines.append(
            f"| {row.name} | {row.rate:.1f} | {row.ceiling_name} | {ratio} | {latency} |"
            f" {row.error_rate:.2%} | {row.goal} |"
        )
    ratio_rows = [row for row in table if row.ceiling]
    lines += ["", "### Throughput ÷ ceiling", "", "![throughput](throughput.svg)", "", "```"]
    for row in ratio_rows:
        lines.append(
            f"{row.name[:34]:<34} ÷ {row.ceiling_name[:22]:<22} {ascii_bar(row.ratio)}"
            f" {row.ratio:.2f}"
        )
    latency_rows = [row for row in table if row.p99 > 0 and "(vs envoy)" not in row.name]
    lines += [
        "```",
        "",
        "### Latency percentiles (ms, log scale)",
        "",
        "![latency](latency.svg)",
        "",
        "```",
    ]
    top = max((row.p99 for row in latency_rows), default=1.0) or 1.0
    for row in latency_rows:
        for label, value in (("p50", row.p50), ("p95", row.p95), ("p99", row.p99)):
            lines.append(
                f"{row.name[:34]:<34} {label} {ascii_bar(log_fraction(value, top))} {value:8.1f}"
            )
    lines += ["```", ""]
    lines += over_time_lines(results, path.parent)
    burst = results["scenarios"].get("first_login_burst")
    if burst:
        lines += [
            "## First-login burst",
            "",
            f"{burst['users']} registered users log in at once; campaign maxParticipants"
            f" {burst['max_participants']}.",
            "",
            "| expected vouchers | in database | users holding one | doubled | seen by clients |"
            " lag P50 ms | lag P95 ms | lag P99 ms | login errors | correct |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
            f"| {burst['expected_vouchers']} | {burst['vouchers_in_database']} |"
            f" {burst['users_with_voucher']} | {burst['doubled']} |"
            f" {burst['vouchers_seen_by_clients']:.0f} | {burst['lag_p50']:.0f} |"
            f" {burst['lag_p95']:.0f} | {burst['lag_p99']:.0f} |"
            f" {burst['login_failed_rate']:.2%} | {'yes' if burst['correct'] else '**NO**'} |",
            "",
            f"Lag: {burst['lag_note']}. The logins themselves queue behind bcrypt"
            f" (login P50 {burst['login_p50']:.0f} ms, P99 {burst['login_p99']:.0f} ms), so this"
            " is not the 100 logins/s goal; `bench/first_login_burst.py` measures the pipeline"
            " alone at a fixed rate.",
            "",
        ]
        topup = burst.get("topup")
        if topup:
            lines += [
                "## Top-up contention",
                "",
                "| vouchers | clients each | succeeded | rejected | errors | most top-ups on one"
                " voucher (db) | vouchers spent (db) | P50 ms | P99 ms | correct |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
                f"| {topup['vouchers']} | {topup['racers_per_voucher']} | {topup['succeeded']:.0f}"
                f" | {topup['rejected']:.0f} | {topup['errors']:.0f} |"
                f" {topup['max_topups_per_voucher_db']} | {topup['vouchers_spent_db']} |"
                f" {topup['p50']:.0f} | {topup['p99']:.0f} |"
                f" {'yes' if topup['correct'] else '**NO**'} |",
                "",
            ]
    lines += server_cpu_lines(results.get("server_cpu", {}))
    lines += nestjs_lines(results)
    path.write_text("\n".join(lines) + "\n")
    maximum = max((row.ratio for row in ratio_rows), default=1.0)
    (path.parent / "throughput.svg").write_text(
        svg_bars(
            "throughput ÷ ceiling",
            [(f"{r.name[:30]} ÷ {r.ceiling_name}", r.ratio, f"{r.ratio:.2f}") for r in ratio_rows],
            max(1.0, maximum),
        )
    )
    latency_bars = [
        (f"{r.name[:34]} {label}", log_fraction(v, top), f"{v:.1f} ms")
        for r in latency_rows
        for label, v in (("p50", r.p50), ("p95", r.p95), ("p99", r.p99))
    ]
    (path.parent / "latency.svg").write_text(
        svg_bars("latency percentiles (log scale)", latency_bars, 1.0)
    )
    return path


SERVER_ORDER = ("envoy", "auth", "promotions", "events", "payments", "postgres", "redis", "kafka")
CPU_NOTE = (
    "CPU per request: user + system time of every process of each component (/proc/<pid>/stat"
    " before and after the scenario) ÷ requests sent; the load generator's CPU is not in it."
)


def _servers(by_scenario: dict[str, Any]) -> list[str]:
    names = {name for entry in by_scenario.values() for name in entry["components"]}
    return [name for name in SERVER_ORDER if name in names] + sorted(names - set(SERVER_ORDER))


def server_cpu_lines(by_scenario: dict[str, Any]) -> list[str]:
    """report.md's table: per scenario, CPU ms per request of each component."""
    if not by_scenario:
        return []
    servers = _servers(by_scenario)
    lines = [
        "## Server CPU per request",
        "",
        CPU_NOTE,
        "",
        "| scenario | requests | /s | P99 ms | load start → end | all servers ms | "
        + " | ".join(f"{name} ms" for name in servers)
        + " |",
        "|---|---:|---:|---:|---|---:|" + "---:|" * len(servers),
    ]
    for scenario, entry in by_scenario.items():
        components = entry["components"]
        load = entry["load_average"]
        lines.append(
            f"| {scenario} | {entry['requests']:.0f} | {entry.get('rate', 0):.1f} |"
            f" {entry.get('p99', 0):.1f} | {load['start']:.2f} → {load['end']:.2f} |"
            f" {entry['per_request_ms']:.2f} | "
            + " | ".join(
                f"{components[name]['per_request_ms']:.2f}" if name in components else "-"
                for name in servers
            )
            + " |"
        )
    return [*lines, ""]


def print_server_cpu(by_scenario: dict[str, Any], *, title: str = "servers") -> None:
    """The same table on the terminal, next to each scenario's throughput and P99."""
    if not by_scenario:
        return
    servers = _servers(by_scenario)
    print(f"\nCPU ms per request of {title} ({CPU_NOTE.split(': ', 1)[1]})")
    print(
        f"{'scenario':<30}{'/s':>8}{'p99':>8}{'load':>12}{'all':>7}"
        + "".join(f"{name[:9]:>10}" for name in servers)
    )
    for scenario, entry in by_scenario.items():
        components = entry["components"]
        load = entry["load_average"]
        print(
            f"{scenario[:29]:<30}{entry.get('rate', 0):>8.1f}{entry.get('p99', 0):>8.1f}"
            f"{load['start']:>6.2f}→{load['end']:<5.2f}{entry['per_request_ms']:>7.2f}"
            + "".join(
                f"{components[name]['per_request_ms']:>10.2f}"
                if name in components
                else f"{'-':>10}"
                for name in servers
            )
        )


def nestjs_lines(results: dict[str, Any]) -> list[str]:
    reference = results["nestjs_reference"]
    scenarios = results["scenarios"]
    lines = [
        "## Against the NestJS reference (same machine kind)",
        "",
        "| figure | NestJS | Cake | Cake ÷ NestJS |",
        "|---|---:|---:|---:|",
    ]

    def add(name: str, nest: float, cake: float | None, lower_is_better: bool = False) -> None:
        if cake is None:
            return
        ratio = (nest / cake if lower_is_better else cake / nest) if cake and nest else 0.0
        lines.append(
            f"| {name} | {nest:.1f} | {cake:.1f} | {ratio:.2f}"
            f"{' (lower better)' if lower_is_better else ''} |"
        )

    login = scenarios.get("login_saturation")
    add(
        "login saturation /s",
        reference["login_per_second"],
        login["rate"] * (1 - login["error_rate"]) if login else None,
    )
    rest = scenarios.get("profile_gateway")
    add("profile reads /s", reference["profile_per_second"], rest["rate"] if rest else None)
    add("profile p95 ms", reference["profile_p95_ms"], rest["p95"] if rest else None, True)
    mix = scenarios.get("mixed_auth")
    if mix:
        total = sum(mix[op]["rate"] for op in ("login", "register", "profile"))
        add("mix iterations /s (fixed rate, not saturation)", reference["mix_per_second"], total)
        add("mix login p95 ms", reference["mix_login_p95_ms"], mix["login"]["p95"], True)
    return [*lines, ""]


def print_summary(results: dict[str, Any]) -> None:
    print()
    print(
        f"=== Cake benchmark ({results['profile']} stack, {results['cores']} cores, load"
        f" {results.get('load_average_at_start', 0):.1f} ->"
        f" {results.get('load_average_at_end', 0):.1f})"
        " ==="
    )
    ceilings = results["ceilings"]
    parts = [f"bcrypt {ceilings['bcrypt']['logins_per_second']:.1f}/s"]
    for key in ("grpc_echo", "envoy_direct_response"):
        if key in ceilings:
            parts.append(f"{ceilings[key]['name']} {ceilings[key]['rate']:.0f}/s")
    print("ceilings: " + ", ".join(parts))
    print(
        f"{'figure':<38}{'/s':>8} {'÷ ceiling':<22}{'ratio':>6}{'p50':>8}{'p95':>8}{'p99':>8}"
        f"{'err':>7}"
    )
    for row in rows(results):
        ratio = f"{row.ratio:.2f}" if row.ceiling else "-"
        print(
            f"{row.name[:37]:<38}{row.rate:>8.1f} {row.ceiling_name[:21]:<22}{ratio:>6}"
            f"{row.p50:>8.1f}{row.p95:>8.1f}{row.p99:>8.1f}{row.error_rate:>7.1%}"
        )
    burst = results["scenarios"].get("first_login_burst")
    if burst:
        print(
            f"first-login burst: vouchers {burst['vouchers_in_database']}/"
            f"{burst['expected_vouchers']} expected, doubled {burst['doubled']},"
            f" lag p50 {burst['lag_p50']:.0f} ms p99 {burst['lag_p99']:.0f} ms"
            f" -> {'OK' if burst['correct'] else 'WRONG'}"
        )
        topup = burst.get("topup")
        if topup:
            print(
                f"top-up race: {topup['succeeded']:.0f} ok of {topup['attempts']} attempts on"
                f" {topup['vouchers']} vouchers, max {topup['max_topups_per_voucher_db']} per"
                f" voucher -> {'OK' if topup['correct'] else 'WRONG'}"
            )
    print_server_cpu(results.get("server_cpu", {}))
    for line in nestjs_lines(results)[4:]:
        if line:
            print("vs NestJS " + line.strip("| ").replace(" | ", "  "))


# -- the goal mode's table (side_by_side.py) ---------------------------------------------------

_DECIMALS = {"logins/s": 1, "reads/s": 0, "ms": 1, "ratio": 2, "requests": 0}


def _figure(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.{_DECIMALS.get(unit, 1)}f}"


def _load(values: list[float]) -> str:
    return " / ".join(f"{value:.2f}" for value in values)


def goal_table_lines(result: dict[str, Any]) -> list[str]:
    """goals.md: the goal mode's table, to paste in docs/performance.md."""
    load = result["load_average"]
    lines = [
        f"Side by side with the peer at {result['peer_url']}: `make bench PEER_URL=...`"
        f" (`bench/run.py --peer-url`), {result['started_at'][:16].replace('T', ' ')} UTC to"
        f" {result['finished_at'][11:16]}, {result['cores']} cores; load average (1, 5, 15"
        f" min) {_load(load['start'])} at the start, {_load(load['end'])} at the end.",
        "",
        "| goal | unit | Cake | peer | ratio | target | result |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for goal in result["goals"]:
        ratio = f"{goal['ratio']:.2f}" if goal["ratio"] is not None else "-"
        note = f" ({goal['note']})" if goal["note"] else ""
        lines.append(
            f"| {goal['goal']}{note} | {goal['unit']} | {_figure(goal['cake'], goal['unit'])} |"
            f" {_figure(goal['peer'], goal['unit'])} | {ratio} | {goal['target']} |"
            f" {goal['verdict']} |"
        )
    lines += [
        "",
        "Ratio: > 1 means Cake is better (Cake ÷ peer for throughput, peer ÷ Cake for latency"
        " and cost). Throughputs are goodputs: successes completed per second in a run's"
        " steady part (after its warm-up, until the last request was sent). CPU per request:"
        " user + system time of every server process (Cake: every stack component; the peer:"
        f" {', '.join(result['peer_processes']) or 'none found'}) with their idle CPU over the"
        " same time taken out, ÷ requests answered 200.",
    ]
    return lines


def print_goal_table(result: dict[str, Any]) -> None:
    load = result["load_average"]
    print(
        f"\n=== goals: Cake vs peer ({result['peer_url']}), {result['cores']} cores, load"
        f" {_load(load['start'])} -> {_load(load['end'])} ==="
    )
    print(f"{'goal':<62}{'Cake':>10}{'peer':>10}{'ratio':>7}  {'target':<34}result")
    for goal in result["goals"]:
        ratio = f"{goal['ratio']:.2f}" if goal["ratio"] is not None else "-"
        print(
            f"{goal['goal'][:61]:<62}{_figure(goal['cake'], goal['unit']):>10}"
            f"{_figure(goal['peer'], goal['unit']):>10}{ratio:>7}  {goal['target'][:33]:<34}"
            f"{goal['verdict']}"
        )
        if goal["note"]:
            print(f"    {goal['note']}")
    failed = [goal["goal"] for goal in result["goals"] if goal["verdict"] == "FAIL"]
    print(f"{len(failed)} goal(s) not met: " + "; ".join(failed) if failed else "every goal met")


def main() -> None:
    source = Path(sys.argv[1])
    results = json.loads(source.read_text())
    print(write_report(results, source.with_name("report.md")))
    print_summary(results)


if __name__ == "__main__":
    main()
