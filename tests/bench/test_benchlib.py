"""The benchmark scripts' guard against the gateway's default per-IP limits (run.py and
chaos.py both call it before any load)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

BENCH = Path(__file__).parents[2] / "bench"


@pytest.fixture(scope="module")
def benchlib() -> ModuleType:
    """bench/benchlib.py, loaded from its file (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("benchlib", BENCH / "benchlib.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("benchlib", module)
    spec.loader.exec_module(module)
    return module


def _stack_with(tmp_path: Path, envoy_yaml: str) -> SimpleNamespace:
    (tmp_path / "envoy").mkdir()
    (tmp_path / "envoy" / "envoy.yaml").write_text(envoy_yaml)
    return SimpleNamespace(run_dir=tmp_path)


@pytest.mark.parametrize(
    ("profile", "variable"),
    [("dev", "CAKE_GATEWAY_PROFILE"), ("test", "CAKE_TEST_GATEWAY_PROFILE")],
)
def test_default_limits_stop_the_run_with_the_fix(
    benchlib: ModuleType, tmp_path: Path, profile: str, variable: str
) -> None:
    stack = _stack_with(tmp_path, "token_bucket: {max_tokens: 100, tokens_per_fill: 100}\n")
    with pytest.raises(SystemExit) as stopped:
        benchlib.require_raised_limits(stack, profile)
    message = str(stopped.value)
    assert message.startswith("the gateway runs the default rate limits")
    assert f"{variable}=bench uv run cake-stack restart envoy --profile {profile}" in message


def test_raised_limits_let_it_run(benchlib: ModuleType, tmp_path: Path) -> None:
    stack = _stack_with(tmp_path, "token_bucket: {max_tokens: 10000000}\n")
    assert benchlib.require_raised_limits(stack, "dev") is None


def test_both_scripts_check_before_any_load() -> None:
    for script in ("run.py", "chaos.py"):
        assert "require_raised_limits(stack, args.profile)" in (BENCH / script).read_text()


def test_a_runs_registrations_never_share_a_phone_number(benchlib: ModuleType) -> None:
    """A goal run registers a few thousand users; a phone number drawn twice is a 409 that
    the mix counts as an error. Within a process every identity has its own number, in the
    Cake System's format."""
    identities = [benchlib.new_identity("t") for _ in range(20_000)]
    phones = [identity["phone"] for identity in identities]
    assert len(set(phones)) == len(phones)
    assert all(phone.startswith("+8491") and len(phone) == 12 for phone in phones)
    assert all(phone[5:].isdigit() for phone in phones)
    assert len({identity["username"] for identity in identities}) == len(identities)
