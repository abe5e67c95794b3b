"""The benchmarks' HTTP load: vegeta (MIT, built by tools/bootstrap.sh from the Go module
proxy into ``.tools/bin``) driven from Python.

A scenario is a list of :class:`Target` (method, URL, body and headers each: tokens,
idempotency keys, unique registrations), written as vegeta's JSON targets; vegeta sends them
in order, cycling, either at a constant arrival rate (open model: ``rate``) or as fast as
``workers`` connections allow (closed model: ``rate=None``). Every result is read back
(``vegeta encode --to json``) and summed up per operation here, into the summary shape the
runner and the report read (``metrics.op_<op>_ms`` percentiles, ``op_<op>_failed`` rates,
``op_ok``), plus the raw samples as CSV for latency over time.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from benchlib import percentile, say

REPO = Path(__file__).resolve().parents[1]
VEGETA = REPO / ".tools" / "bin" / "vegeta"
TIMEOUT_SECONDS = 60
REFUSALS = (429, 503)
"""Answers that refuse a request to protect the service (with Retry-After)."""
NO_ANSWER = 0
"""vegeta's code for a request that got no HTTP answer (client timeout, refused connection)."""


@dataclass(frozen=True)
class Target:
    """One request; ``op`` names it in the summary, ``ok_status`` is its success."""

    op: str
    method: str
    url: str
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    ok_status: int = 200

    @classmethod
    def json(
        cls,
        op: str,
        url: str,
        body: Any,
        *,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        ok_status: int = 200,
    ) -> Target:
        all_headers = {"content-type": "application/json", **(headers or {})}
        if token:
            all_headers["authorization"] = f"Bearer {token}"
        return cls(op, "POST", url, json.dumps(body).encode(), all_headers, ok_status)

    @classmethod
    def get(cls, op: str, url: str, *, token: str | None = None) -> Target:
        return cls(op, "GET", url, None, {"authorization": f"Bearer {token}"} if token else {})

    def vegeta_json(self, seq: int) -> str:
        # The sequence number in the fragment ties each result back to its target (vegeta
        # reports the target's URL as given; the fragment never leaves the client).
        line: dict[str, Any] = {
            "method": self.method,
            "url": f"{self.url}#{seq}",
            "header": {name: [value] for name, value in self.headers.items()},
        }
        if self.body is not None:
            line["body"] = base64.b64encode(self.body).decode()
        return json.dumps(line)


def vegeta_binary() -> Path:
    if not VEGETA.exists():
        raise SystemExit(f"{VEGETA} is missing: run `bash tools/bootstrap.sh` (it builds vegeta)")
    return VEGETA


def attack(
    name: str,
    targets: Sequence[Target],
    directory: Path,
    *,
    duration_s: float,
    rate: float | None,
    workers: int,
    samples_csv: Path | None = None,
    timeout_s: float = TIMEOUT_SECONDS,
    max_workers: int | None = None,
    window: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Run one vegeta attack over ``targets``; its summary (see the module docstring).

    ``rate``: requests per second (open model; vegeta adds workers as needed, up to
    ``max_workers``, by default ``max(workers, 10 x rate)``); ``None``: closed model with
    ``workers`` connections. ``timeout_s``: the client's timeout (a request unanswered by
    then is a result with code 0). ``window``: (from, to) seconds after the first request;
    the summary then has each operation's successes completed in that window
    (``op_<op>_window``: the goodput of the run's steady part).
    """
    if not targets:
        raise ValueError("an attack needs targets")
    vegeta = vegeta_binary()
    targets_file = directory / f"targets-{name}.jsonl"
    results_file = directory / f"results-{name}.bin"
    targets_file.write_text(
        "\n".join(target.vegeta_json(seq) for seq, target in enumerate(targets)) + "\n"
    )
    command = [
        str(vegeta),
        "attack",
        "-format=json",
        f"-targets={targets_file}",
        f"-duration={duration_s:g}s",
        f"-timeout={timeout_s:g}s",
        "-keepalive=true",
        f"-output={results_file}",
    ]
    if rate is None:
        command += ["-rate=0", f"-max-workers={workers}", f"-workers={workers}"]
    else:
        command += [
            f"-rate={_vegeta_rate(rate)}",
            f"-workers={workers}",
            f"-max-workers={max_workers or max(workers, math.ceil(10 * rate))}",
        ]
    model = f"{workers} connections, closed" if rate is None else f"{rate:g}/s, open"
    say(f"vegeta {name}: {len(targets)} targets, {model}, {duration_s:g}s")
    started = time.monotonic()
    completed = subprocess.run(command, check=False, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    say(f"vegeta {name} finished in {elapsed:.1f}s (exit {completed.returncode})")
    if completed.returncode != 0:
        raise RuntimeError(f"vegeta {name} failed: {completed.stderr.strip()[-2000:]}")
    encoded = subprocess.run(
        [str(vegeta), "encode", "--to", "json", str(results_file)],
        check=True,
        capture_output=True,
        text=True,
    )
    results = [json.loads(line) for line in encoded.stdout.splitlines() if line]
    summary = summarise(results, targets, window=window)
    if samples_csv is not None:
        write_samples(samples_csv, results, targets)
    for op, _ in sorted(summary["ops"].items()):
        values = summary["metrics"][f"op_{op}_ms"]["values"]
        failed = summary["metrics"][f"op_{op}_failed"]["values"]
        say(
            f"  op_{op}_ms n={values['count']:.0f} p50={values['med']:.1f} "
            f"p95={values['p(95)']:.1f} p99={values['p(99)']:.1f} ms, "
            f"failed {failed['rate']:.1%} {summary['statuses'].get(op, {})}"
        )
        accepted = summary["metrics"][f"op_{op}_ok_ms"]["values"]
        refused = summary["metrics"][f"op_{op}_refused_ms"]["values"]
        if refused["count"]:
            say(
                f"    accepted p95={accepted.get('p(95)', 0.0):.1f} ms; "
                f"{refused['count']:.0f} refused (429/503), p95={refused['p(95)']:.1f} ms"
            )
        answers = summary["metrics"][f"op_{op}_answers"]["values"]
        if answers["no_answer"]:
            say(f"    {answers['no_answer']} without an answer ({answers['timeouts']} timed out)")
    return summary


def _vegeta_rate(rate: float) -> str:
    """vegeta's ``-rate`` takes whole requests per period: 179.2/s is 1792 per 10 s."""
    if rate == int(rate):
        return f"{int(rate)}/1s"
    return f"{round(rate * 100)}/100s"


def _target_of(result: Mapping[str, Any], targets: Sequence[Target]) -> Target:
    return targets[int(str(result["url"]).rsplit("#", 1)[1])]


def _timestamp(result: Mapping[str, Any]) -> float:
    # RFC 3339 with nanoseconds: keep microseconds for fromisoformat.
    stamp = str(result["timestamp"])
    head, _, tail = stamp.partition(".")
    if tail:
        digits = "".join(c for c in tail if c.isdigit())
        zone = tail[len(digits) :]
        stamp = f"{head}.{digits[:6]}{'+00:00' if zone == 'Z' else zone}"
    elif stamp.endswith("Z"):
        stamp = stamp[:-1] + "+00:00"
    return datetime.fromisoformat(stamp).timestamp()


def trend(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"count": 0.0}
    return {
        "count": float(len(values)),
        "avg": sum(values) / len(values),
        "min": min(values),
        "med": percentile(values, 0.50),
        "max": max(values),
        "p(90)": percentile(values, 0.90),
        "p(95)": percentile(values, 0.95),
        "p(99)": percentile(values, 0.99),
    }


def _has_retry_after(result: Mapping[str, Any]) -> bool:
    headers = result.get("headers") or {}
    return any(name.lower() == "retry-after" and values for name, values in headers.items())


def _timed_out(result: Mapping[str, Any]) -> bool:
    # Go's http client: "... (Client.Timeout exceeded while awaiting headers)" or
    # "context deadline exceeded"; a refused or reset connection says otherwise.
    error = str(result.get("error", "")).lower()
    return "timeout" in error or "deadline exceeded" in error


def summarise(
    results: Iterable[Mapping[str, Any]],
    targets: Sequence[Target],
    *,
    window: tuple[float, float] | None = None,
) -> dict[str, Any]:
    latencies: dict[str, list[float]] = {}
    ok_latencies: dict[str, list[float]] = {}
    refused_latencies: dict[str, list[float]] = {}
    failures: dict[str, int] = {}
    statuses: dict[str, dict[str, int]] = {}
    answers: dict[str, dict[str, int]] = {}
    ok_done_at: dict[str, list[float]] = {}
    sent: dict[str, list[tuple[float, float]]] = {}
    stamps: list[float] = []
    ok = 0
    for result in results:
        target = _target_of(result, targets)
        latencies.setdefault(target.op, []).append(int(result["latency"]) / 1e6)
        code = int(result["code"])
        by_code = statuses.setdefault(target.op, {})
        by_code[str(code)] = by_code.get(str(code), 0) + 1
        kinds = answers.setdefault(
            target.op, {"no_answer": 0, "timeouts": 0, "refused_without_retry_after": 0}
        )
        sent_at = _timestamp(result)
        stamps.append(sent_at + int(result["latency"]) / 1e9)
        stamps.append(sent_at)
        latency_ms = int(result["latency"]) / 1e6
        sent.setdefault(target.op, []).append((sent_at, latency_ms))
        if code == target.ok_status:
            ok += 1
            ok_latencies.setdefault(target.op, []).append(latency_ms)
            ok_done_at.setdefault(target.op, []).append(sent_at + latency_ms / 1000)
        else:
            if code in REFUSALS:
                refused_latencies.setdefault(target.op, []).append(latency_ms)
                kinds["refused_without_retry_after"] += not _has_retry_after(result)
            elif code == NO_ANSWER:
                kinds["no_answer"] += 1
                kinds["timeouts"] += _timed_out(result)
            failures[target.op] = failures.get(target.op, 0) + 1
    duration_s = (max(stamps) - min(stamps)) if stamps else 0.0
    metrics: dict[str, Any] = {
        "op_ok": {"values": {"count": ok, "rate": ok / duration_s if duration_s else 0.0}}
    }
    for op, values in latencies.items():
        metrics[f"op_{op}_ms"] = {"values": trend(values)}
        metrics[f"op_{op}_failed"] = {"values": {"rate": failures.get(op, 0) / len(values)}}
        # Accepted and refused answers apart: under overload the goal is about the first
        # (short waits) and the second (refused at once), not their mixture.
        metrics[f"op_{op}_ok_ms"] = {"values": trend(ok_latencies.get(op, []))}
        metrics[f"op_{op}_refused_ms"] = {"values": trend(refused_latencies.get(op, []))}
        metrics[f"op_{op}_answers"] = {"values": answers[op]}
        if window is not None:
            metrics[f"op_{op}_window"] = {
                "values": _window(ok_done_at.get(op, []), min(stamps), window)
            }
            # Every answer (errors too) to the requests sent in the window: the latency of
            # the steady part, without the first requests' connection set-up (vegeta opens
            # a connection per worker at once when a run starts).
            start, end = min(stamps) + window[0], min(stamps) + window[1]
            metrics[f"op_{op}_window_ms"] = {
                "values": trend([ms for at, ms in sent[op] if start <= at < end])
            }
    return {
        "metrics": metrics,
        "state": {"testRunDurationMs": duration_s * 1000},
        "ops": {op: len(values) for op, values in latencies.items()},
        "statuses": statuses,
    }


def _window(
    done_at: Sequence[float], first: float, window: tuple[float, float]
) -> dict[str, float]:
    """Successes completed between ``window`` seconds after ``first`` (the first request
    sent), and their rate: the goodput of a run's steady part, without its ramp-up and
    without the drain after the last request was sent."""
    start, end = first + window[0], first + window[1]
    seconds = window[1] - window[0]
    count = sum(1 for at in done_at if start <= at < end)
    return {
        "from_s": window[0],
        "to_s": window[1],
        "ok": float(count),
        "ok_per_second": count / seconds if seconds > 0 else 0.0,
    }


def write_samples(
    path: Path, results: Iterable[Mapping[str, Any]], targets: Sequence[Target]
) -> None:
    """One row a request (``metric_name``, ``timestamp``, ``metric_value`` in ms)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["metric_name", "timestamp", "metric_value"])
        for result in results:
            op = _target_of(result, targets).op
            writer.writerow([f"op_{op}_ms", _timestamp(result), int(result["latency"]) / 1e6])
