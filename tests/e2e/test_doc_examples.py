"""Every block marked ``<!-- example: NAME -->`` in the README and docs/ runs as pasted against
the test stack, so the examples a reader copies cannot rot. A block must exit 0 under
``bash -e -o pipefail`` (the examples use ``curl -f``: an HTTP error fails them); the
README's examples are also held to what they print. The quickstart has its own test
(test_readme_quickstart.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cake_devtools.stack import Stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[2]
EXAMPLE = re.compile(r"<!-- example: ([a-z0-9-]+) -->\n```bash\n(.*?)```", flags=re.DOTALL)


def examples() -> dict[str, tuple[Path, str]]:
    found: dict[str, tuple[Path, str]] = {}
    for document in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for name, script in EXAMPLE.findall(document.read_text(encoding="utf-8")):
            assert name not in found, f"example {name!r} is named twice"
            found[name] = (document, script)
    return found


def _rest_client(lines: list[str]) -> None:
    assert lines[0] == "register: 201"
    profile = json.loads(lines[1])
    assert re.fullmatch(r"bao_\d{8}", profile["username"]), profile
    assert json.loads(lines[2]) == []
    # A bad token: 401 with the google.rpc.Status shape (code 16, UNAUTHENTICATED).
    assert json.loads(lines[3])["code"] == 16
    assert lines[4] == "status: 401"
    assert len(lines) == 5


def _grpc_caller(lines: list[str]) -> None:
    (line,) = lines
    assert re.fullmatch(r"profile: chi_\d{8} vouchers: 0", line), line


def _operator(lines: list[str]) -> None:
    health = json.loads(lines[0])
    assert health["status"] in {"healthy", "degraded"}, health
    assert re.fullmatch(r"created admin user 'ops_\d{8}' \(id \d+, .*\)", lines[1]), lines[1]
    assert isinstance(json.loads(lines[2]), dict)
    assert "deadLetters" in json.loads(lines[3]) or json.loads(lines[3]) == {}


#: What the README's examples must print (the other examples must exit 0).
EXPECTED: dict[str, Callable[[list[str]], None]] = {
    "rest-client": _rest_client,
    "grpc-caller": _grpc_caller,
    "operator": _operator,
}


def test_the_readme_has_an_example_for_each_kind_of_reader() -> None:
    readme = {name for name, (document, _) in examples().items() if document.name == "README.md"}
    assert readme == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(examples()))
def test_the_example_runs_as_pasted(name: str, full_stack: Stack) -> None:
    document, script = examples()[name]
    environment = {
        **os.environ,
        # The auth CLI acts on the test stack's database, and the gateway is the test stack's.
        **full_stack.service_environment()["auth"],
        "G": full_stack.gateway_url,
    }
    ran = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    where = f"{document.relative_to(ROOT)}, example {name!r}"
    assert ran.returncode == 0, f"{where}\n{ran.stdout}\n{ran.stderr}"
    check = EXPECTED.get(name)
    if check is not None:
        check(ran.stdout.splitlines())
