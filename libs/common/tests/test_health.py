from __future__ import annotations

import asyncio
from typing import Any

import pytest
from cake_common.grpc_server import DependencyCheck, DependencyWatcher, ServiceHealth
from cake_common.grpc_server import health as health_module
from grpc_health.v1 import health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class RecordingLogger:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.events.append((level, event, fields))


async def _status(health: ServiceHealth, name: str) -> int:
    request = health_pb2.HealthCheckRequest(service=name)
    response = await health.servicer.Check(request, None)
    return int(response.status)


class Switch:
    def __init__(self, up: bool) -> None:
        self.up = up
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        if not self.up:
            raise ConnectionRefusedError("refused")


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> RecordingLogger:
    recorder = RecordingLogger()
    monkeypatch.setattr(health_module, "_log", recorder)
    return recorder


async def test_overall_follows_critical_components_only() -> None:
    health = ServiceHealth(["svc.A", "svc.B"])
    await health.initialize()
    assert await _status(health, "") == NOT_SERVING, "not ready yet"
    await health.set_ready(True)
    for name in ("", "svc.A", "svc.B", "liveness"):
        assert await _status(health, name) == SERVING

    await health.set_component("redis", False, critical=False)
    assert await _status(health, "") == SERVING
    assert await _status(health, "redis") == NOT_SERVING

    await health.set_component("postgres", False)
    assert not health.is_serving
    assert await _status(health, "svc.A") == NOT_SERVING
    assert await _status(health, "liveness") == SERVING, "liveness ignores dependencies"

    await health.set_component("postgres", True)
    assert await _status(health, "svc.B") == SERVING
    assert health.components["postgres"].critical is True
    assert health.components["redis"].serving is False


async def test_graceful_shutdown_is_final() -> None:
    health = ServiceHealth(["svc.A"])
    await health.initialize()
    await health.set_ready(True)
    await health.enter_graceful_shutdown()
    await health.set_ready(True)
    await health.set_component("postgres", True)
    for name in ("", "svc.A", "liveness"):
        assert await _status(health, name) == NOT_SERVING


async def test_reserved_component_names_rejected() -> None:
    health = ServiceHealth(["svc.A"])
    for name in ("", "svc.A", "liveness"):
        with pytest.raises(ValueError, match="reserved"):
            await health.set_component(name, True)


async def test_watcher_sets_statuses_and_logs_transitions_only(recorder: RecordingLogger) -> None:
    health = ServiceHealth(["svc.A"])
    await health.initialize()
    await health.set_ready(True)
    database = Switch(up=True)
    cache = Switch(up=False)
    watcher = DependencyWatcher(
        health,
        [DependencyCheck("postgres", database), DependencyCheck("redis", cache, critical=False)],
    )

    assert await watcher.check_all() == {"postgres": True, "redis": False}
    assert health.is_serving
    assert [(e[1], e[2]["dependency"]) for e in recorder.events] == [
        ("dependency up", "postgres"),
        ("dependency down", "redis"),
    ]

    recorder.events.clear()
    await watcher.check_all()
    await watcher.check_all()
    assert recorder.events == [], "steady state logs nothing"

    database.up = False
    await watcher.check_all()
    await watcher.check_all()
    assert not health.is_serving
    assert [(e[0], e[1]) for e in recorder.events] == [("warning", "dependency down")]
    assert "refused" in recorder.events[0][2]["error"]

    database.up = True
    await watcher.check_all()
    assert health.is_serving
    assert recorder.events[-1][1] == "dependency up"


async def test_probe_timeout_and_false_are_failures(recorder: RecordingLogger) -> None:
    health = ServiceHealth([])

    async def hangs() -> None:
        await asyncio.sleep(10)

    async def says_no() -> bool:
        return False

    async def says_yes() -> bool:
        return True

    watcher = DependencyWatcher(
        health,
        [
            DependencyCheck("slow", hangs, timeout_seconds=0.05),
            DependencyCheck("no", says_no),
            DependencyCheck("yes", says_yes),
        ],
    )
    assert await asyncio.wait_for(watcher.check_all(), 2) == {
        "slow": False,
        "no": False,
        "yes": True,
    }
    errors = {e[2]["dependency"]: e[2].get("error") for e in recorder.events}
    assert "0.05" in errors["slow"]


async def test_background_loop_runs_and_stops(recorder: RecordingLogger) -> None:
    health = ServiceHealth([])
    probe = Switch(up=True)
    watcher = DependencyWatcher(health, [DependencyCheck("db", probe)], interval_seconds=0.01)
    watcher.start()
    watcher.start()  # second start is a no-op
    for _ in range(200):
        if probe.calls >= 3:
            break
        await asyncio.sleep(0.01)
    await watcher.stop()
    calls = probe.calls
    assert calls >= 3
    await asyncio.sleep(0.05)
    assert probe.calls == calls, "stopped"
    await watcher.stop()  # idempotent
