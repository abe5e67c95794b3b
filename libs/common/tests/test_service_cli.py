"""``run_service_cli``: the command line of the services without operator commands."""

from __future__ import annotations

import pytest
from cake_common.service_runtime import run_service_cli
from cake_common.settings import ServiceSettings


class Settings(ServiceSettings):
    pass


@pytest.fixture(autouse=True)
def _database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAKE_DATABASE_URL", "postgresql+psycopg://u:p@h/db")
    monkeypatch.setenv("CAKE_SERVICE_NAME", "demo")
    monkeypatch.setenv("CAKE_GRPC_PORT", "0")


def cli(
    calls: list[tuple[str, object]],
) -> dict[str, object]:
    async def serve(settings: Settings) -> None:
        calls.append(("serve", settings))

    async def relay(settings: Settings) -> None:
        calls.append(("relay", settings))

    return {
        "prog": "cake-demo",
        "description": "demo",
        "settings": Settings,
        "processes": {"serve": ("serve it", serve), "relay": ("relay it", relay)},
        "migrate": lambda settings: calls.append(("migrate", settings)),
    }


@pytest.mark.parametrize("command", ["serve", "relay", "migrate"])
def test_each_command_runs_its_own_step_with_the_settings(command: str) -> None:
    calls: list[tuple[str, object]] = []
    run_service_cli([command], **cli(calls))  # type: ignore[arg-type]
    [(ran, settings)] = calls
    assert ran == command
    assert isinstance(settings, Settings)


def test_an_unknown_or_missing_command_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls: list[tuple[str, object]] = []
    for argv in (["bake"], []):
        with pytest.raises(SystemExit) as exit_info:
            run_service_cli(argv, **cli(calls))  # type: ignore[arg-type]
        assert exit_info.value.code == 2
    assert calls == []
    assert "serve it" in run_help(capsys)


def run_help(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        run_service_cli(["--help"], **cli([]))  # type: ignore[arg-type]
    return capsys.readouterr().out
