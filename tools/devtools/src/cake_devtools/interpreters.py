"""The other CPython versions Cake supports, found on this machine for the tests that prove it.

Cake runs on Python 3.11 and later (no upper bound in any ``pyproject.toml``); ``make test``
also builds the client wheels and runs the unit layer on 3.12 and 3.13. The machines Cake is
developed and tested on carry those interpreters under pyenv (``~/.pyenv/versions/3.13.0``),
whose shims uv cannot query, so this looks in pyenv's versions directory first, then on
``PATH``. A version that is not found is an error with the way to install it: the claim
"works on 3.13" is not to be skipped silently.

    python -m cake_devtools.interpreters 3.13   # prints the interpreter's path, or fails
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

#: The minor versions besides the workspace's own (3.11) that ``make test`` runs on.
OTHER_SUPPORTED_VERSIONS = ("3.12", "3.13")


class InterpreterNotFoundError(LookupError):
    """No CPython of the asked minor version on this machine."""


def _reports(python: Path, version: str) -> bool:
    try:
        done = subprocess.run(
            [str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError:
        return False
    return done.returncode == 0 and done.stdout.strip() == version


def find_interpreter(version: str) -> Path:
    """A CPython ``version`` ("3.13") interpreter: pyenv's newest such version, else PATH's."""
    pyenv_root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    candidates = sorted(
        (pyenv_root / "versions").glob(f"{version}.*/bin/python{version}"),
        key=lambda path: [int(part) for part in path.parents[1].name.split(".") if part.isdigit()],
        reverse=True,
    )
    on_path = shutil.which(f"python{version}")
    if on_path is not None:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if _reports(candidate, version):
            return candidate
    raise InterpreterNotFoundError(
        f"no Python {version} on this machine (looked in {pyenv_root}/versions/{version}.*"
        f" and for python{version} on PATH): install it, e.g. `pyenv install {version}`"
    )


def main(argv: list[str] | None = None) -> int:
    versions = (argv if argv is not None else sys.argv[1:]) or list(OTHER_SUPPORTED_VERSIONS)
    try:
        for version in versions:
            print(find_interpreter(version))
    except InterpreterNotFoundError as error:
        print(f"cake_devtools.interpreters: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
