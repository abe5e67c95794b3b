"""``uv build`` makes wheels of cake-client and cake-protos that a plain Python 3.11+
environment installs and imports, with nothing of the workspace on its path."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

#: Builds wheels and installs them in a fresh environment: `make test` runs it, the quick
#: `make test-unit` does not.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[3]


def _run(*command: str, cwd: Path = ROOT) -> str:
    done = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _metadata(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return archive.read(name).decode().splitlines()


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    for package in ("cake-client", "cake-protos"):
        _run("uv", "build", "--package", package, "--wheel", "--out-dir", str(out))
    return {wheel.name.split("-")[0]: wheel for wheel in out.glob("*.whl")}


def test_the_wheels_are_pure_python_for_3_11_and_later(wheels: dict[str, Path]) -> None:
    assert set(wheels) == {"cake_client", "cake_protos"}
    for wheel in wheels.values():
        assert wheel.name.endswith("-py3-none-any.whl")
        assert "Requires-Python: >=3.11" in _metadata(wheel)
    client = _metadata(wheels["cake_client"])
    assert "Requires-Dist: cake-protos" in client
    assert "Requires-Dist: protobuf<8,>=7.35.1" in _metadata(wheels["cake_protos"])


def test_a_fresh_environment_installs_and_imports_them(
    wheels: dict[str, Path], tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    _run("uv", "venv", "--quiet", "--python", sys.executable, str(venv))
    python = venv / "bin" / "python"
    _run("uv", "pip", "install", "--quiet", "--python", str(python), *map(str, wheels.values()))
    printed = _run(
        str(python),
        "-c",
        "import cake_client, cake.auth.v1.auth_pb2 as a; "
        "print(cake_client.__file__); print(a.LoginRequest(account='x').account)",
        cwd=tmp_path,
    ).splitlines()
    assert printed[0].startswith(str(venv))
    assert printed[1] == "x"
