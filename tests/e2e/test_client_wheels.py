"""The cake-client and cake-protos wheels that ``uv build`` makes install on Python 3.11, 3.12
and 3.13, and the client's example, run from each fresh environment (nothing of the
workspace on its path), logs in and reads the user's vouchers through the real gateway.

An interpreter that is missing fails the test with the way to install it: "Python 3.11 and
later" is a claim this test keeps true, so it must not turn into a skip on a machine that
cannot check it.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
from cake.auth.v1 import auth_pb2
from cake_client import connect
from cake_devtools.interpreters import InterpreterNotFoundError, find_interpreter
from cake_devtools.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "libs" / "client" / "examples" / "my_account.py"


def _run(*command: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def _ok(*command: str, cwd: Path = ROOT) -> str:
    done = _run(*command, cwd=cwd)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("wheels")
    for package in ("cake-client", "cake-protos"):
        _ok("uv", "build", "--package", package, "--wheel", "--out-dir", str(out))
    built = sorted(out.glob("*.whl"))
    assert [wheel.name.split("-")[0] for wheel in built] == ["cake_client", "cake_protos"]
    return built


@pytest.mark.parametrize("version", ["3.11", "3.12", "3.13"])
async def test_the_wheels_run_the_example_on_each_supported_python(
    version: str, wheels: list[Path], full_stack: Stack, tmp_path: Path
) -> None:
    try:
        interpreter = find_interpreter(version)
    except InterpreterNotFoundError as error:
        pytest.fail(str(error))
    venv = tmp_path / f"venv-{version}"
    _ok("uv", "venv", "--quiet", "--python", str(interpreter), str(venv))
    python = venv / "bin" / "python"
    _ok("uv", "pip", "install", "--quiet", "--python", str(python), *map(str, wheels))
    where = _ok(
        str(python),
        "-c",
        "import sys, cake_client, google.protobuf, grpc; "
        "print('%d.%d' % sys.version_info[:2]); print(cake_client.__file__); "
        "print(google.protobuf.__version__.split('.')[0])",
        cwd=tmp_path,
    ).splitlines()
    # The interpreter asked for, the installed wheel (not the workspace), protobuf 7.
    assert where[0] == version
    assert where[1].startswith(str(venv))
    assert where[2] == "7"

    target = full_stack.gateway_url.removeprefix("http://")
    suffix = uuid.uuid4().hex[:10]
    password = f"wheel-{suffix}"
    async with connect(target) as cake:
        registered = await cake.auth.Register(
            auth_pb2.RegisterRequest(
                fullname="Wheel Test",
                username=f"wheel_{suffix}",
                email=f"wheel_{suffix}@example.com",
                phone=f"+848{int(suffix, 16) % 10**8:08d}",
                password=password,
                birthday="1990-01-01",
            )
        )
    user = registered.user
    ran = _run(str(python), str(EXAMPLE), target, user.email, password, cwd=tmp_path, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == [
        f"user {user.id} {user.username} <{user.email}>",
        "vouchers: 0",
    ]
    refused = _run(str(python), str(EXAMPLE), target, user.email, "wrong", cwd=tmp_path, timeout=60)
    assert (refused.returncode, refused.stderr.split(":")[0]) == (1, "UNAUTHENTICATED")
