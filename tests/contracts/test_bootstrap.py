"""Every composition root (``services/<name>/src/cake_<name>/bootstrap.py``) has one shape.

``start_server`` reads the settings, then inside ``async with StartUp() as start_up:`` runs the
same steps under the same names, in this order: ``open_resources`` (database engine, Redis,
Kafka and gRPC clients, each registered with ``start_up.closes``), ``build_adapters``,
``build_use_cases``, ``build_entry_points`` (the gRPC server; consumers and workers registered
with ``start_up.runs``), and ends with ``return await start_up.serve(builder)``. ``serve`` is
``serve_until_signal`` around ``start_server``. Closing in reverse order, and the clean-up of
a start that fails half way, are ``cake_common.service_runtime.StartUp``'s alone: a
bootstrap registers no shutdown hook of its own, has no ``except`` of its own around the
start and keeps no exit stack. Read from the source with ``ast``, so nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = sorted(path.parent.name for path in ROOT.glob("services/*/pyproject.toml"))

STEPS = ("open_resources", "build_adapters", "build_use_cases", "build_entry_points")
"""The steps of ``start_server``, in their order; each a top-level function of the module."""

FORBIDDEN_CALLS = (
    "add_shutdown_hook",
    "run_shutdown_hooks",
    "AsyncExitStack",
    "push_async_callback",
)
"""Closing by hand: the start-up object does it, in one order, on every path."""


def _bootstrap(service: str) -> Path:
    return ROOT / "services" / service / "src" / f"cake_{service}" / "bootstrap.py"


def _called_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def _calls_in_order(body: list[ast.stmt]) -> list[str]:
    calls = [
        node for statement in body for node in ast.walk(statement) if isinstance(node, ast.Call)
    ]
    calls.sort(key=lambda node: (node.lineno, node.col_offset))
    return [_called_name(node) for node in calls]


def shape_problems(source: str) -> list[str]:
    """What makes ``source`` (a bootstrap module) depart from the shape; empty if nothing."""
    tree = ast.parse(source)
    functions = {
        node.name: node
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    problems = [
        f"no top-level function {name}"
        for name in (*STEPS, "start_server", "serve")
        if name not in functions
    ]
    if problems:
        return problems
    if not isinstance(functions["open_resources"], ast.AsyncFunctionDef):
        problems.append("open_resources is not async (it waits for the database)")
    for name in ("start_server", "serve"):
        if not isinstance(functions[name], ast.AsyncFunctionDef):
            problems.append(f"{name} is not async")

    start_server = functions["start_server"]
    blocks = [
        node
        for node in start_server.body
        if isinstance(node, ast.AsyncWith)
        and len(node.items) == 1
        and isinstance(node.items[0].context_expr, ast.Call)
        and _called_name(node.items[0].context_expr) == "StartUp"
        and isinstance(node.items[0].optional_vars, ast.Name)
        and node.items[0].optional_vars.id == "start_up"
    ]
    if len(blocks) != 1 or start_server.body[-1] is not blocks[0]:
        problems.append("start_server does not end in one `async with StartUp() as start_up:`")
    else:
        block = blocks[0]
        steps = [name for name in _calls_in_order(block.body) if name in STEPS]
        if steps != list(STEPS):
            problems.append(f"start_server's steps are {steps}, not {list(STEPS)}")
        last = block.body[-1]
        if not (
            isinstance(last, ast.Return)
            and isinstance(last.value, ast.Await)
            and isinstance(last.value.value, ast.Call)
            and _called_name(last.value.value) == "serve"
            and isinstance(last.value.value.func, ast.Attribute)
            and isinstance(last.value.value.func.value, ast.Name)
            and last.value.value.func.value.id == "start_up"
        ):
            problems.append(
                "start_server's block does not end in `return await start_up.serve(...)`"
            )
    if any(isinstance(node, ast.Try) for node in ast.walk(start_server)):
        problems.append("start_server cleans up by hand (a try of its own)")

    serve_calls = [
        node
        for node in ast.walk(functions["serve"])
        if isinstance(node, ast.Call) and _called_name(node) == "serve_until_signal"
    ]
    if not any(
        any(isinstance(arg, ast.Name) and arg.id == "start_server" for arg in call.args)
        for call in serve_calls
    ):
        problems.append("serve does not run serve_until_signal(settings, start_server)")

    order = [
        node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    defined = [name for name in order if name in (*STEPS, "start_server", "serve")]
    if defined != [*STEPS, "start_server", "serve"]:
        problems.append(f"the steps are defined in the order {defined}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _called_name(node) in FORBIDDEN_CALLS:
            problems.append(f"line {node.lineno}: {_called_name(node)} (closing by hand)")
    return problems


@pytest.mark.parametrize("service", SERVICES)
def test_every_bootstrap_has_the_one_shape(service: str) -> None:
    assert shape_problems(_bootstrap(service).read_text()) == []


SHAPED = """
async def open_resources(settings, start_up): ...
def build_adapters(settings, resources): ...
def build_use_cases(settings, adapters): ...
def build_entry_points(settings, resources, adapters, use_cases, start_up): ...
async def start_server(settings):
    check(settings)
    async with StartUp() as start_up:
        resources = await open_resources(settings, start_up)
        adapters = build_adapters(settings, resources)
        use_cases = build_use_cases(settings, adapters)
        builder = build_entry_points(settings, resources, adapters, use_cases, start_up)
        return await start_up.serve(builder)
async def serve(settings):
    await serve_until_signal(settings, start_server)
"""


def test_the_check_accepts_the_shape() -> None:
    assert shape_problems(SHAPED) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (("def build_adapters", "def make_adapters"), "no top-level function build_adapters"),
        (
            (
                "        adapters = build_adapters(settings, resources)\n"
                "        use_cases = build_use_cases(settings, adapters)\n",
                "        use_cases = build_use_cases(settings, None)\n"
                "        adapters = build_adapters(settings, resources)\n",
            ),
            "start_server's steps are",
        ),
        (
            (
                "        return await start_up.serve(builder)",
                "        return await builder.start()",
            ),
            "does not end in `return await start_up.serve(...)`",
        ),
        (
            (
                "    async with StartUp() as start_up:",
                "    async with AsyncExitStack() as start_up:",
            ),
            "does not end in one `async with StartUp() as start_up:`",
        ),
        (
            (
                "        builder = build_entry_points(",
                "        builder.add_shutdown_hook(engine.dispose)\n"
                "        builder = build_entry_points(",
            ),
            "add_shutdown_hook (closing by hand)",
        ),
        (
            (
                "    check(settings)\n",
                "    try:\n        check(settings)\n    except BaseException:\n        raise\n",
            ),
            "cleans up by hand",
        ),
        (
            ("await serve_until_signal(settings, start_server)", "await start_server(settings)"),
            "serve does not run serve_until_signal",
        ),
    ],
)
def test_the_check_catches_a_departure(change: tuple[str, str], problem: str) -> None:
    old, new = change
    assert old in SHAPED
    problems = shape_problems(SHAPED.replace(old, new))
    assert any(problem in found for found in problems), problems
