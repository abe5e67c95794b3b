"""The first Kafka download reports progress as Maven fetches artifacts (a stand-in ``mvn``
script prints Maven's batch-mode lines; the parsing and echo are what is tested)."""

from __future__ import annotations

import stat
from pathlib import Path
from types import SimpleNamespace

from cake_devtools.stack.kafka import _copy_dependencies


def _fake_mvn(tmp_path: Path, artifacts: int, exit_code: int = 0) -> str:
    script = tmp_path / "mvn"
    lines = "\n".join(
        f'echo "[INFO] Downloaded from central: https://repo.maven.apache.org/maven2/org/x/'
        f'a{n}/1.0/a{n}-1.0.jar (1.0 kB at 2.0 kB/s)"'
        for n in range(1, artifacts + 1)
    )
    script.write_text(
        f"#!/bin/sh\necho '[INFO] Scanning for projects...'\n{lines}\nexit {exit_code}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def _context(tmp_path: Path, echoed: list[str]) -> SimpleNamespace:
    return SimpleNamespace(
        layout=SimpleNamespace(kafka_pom=tmp_path / "pom.xml"), echo=echoed.append
    )


def test_progress_is_echoed_every_ten_artifacts_and_at_the_end(tmp_path: Path) -> None:
    echoed: list[str] = []
    code, output = _copy_dependencies(
        _fake_mvn(tmp_path, 25),
        _context(tmp_path, echoed),
        tmp_path / "out",  # type: ignore[arg-type]
    )
    assert code == 0
    assert echoed == [
        "  kafka: 1 artifacts downloaded (a1-1.0.jar)",
        "  kafka: 11 artifacts downloaded (a11-1.0.jar)",
        "  kafka: 21 artifacts downloaded (a21-1.0.jar)",
        "  kafka: 25 artifacts downloaded in all",
    ]
    assert output.count("Downloaded from central") == 25


def test_a_failed_run_gives_its_exit_code_and_output(tmp_path: Path) -> None:
    echoed: list[str] = []
    code, output = _copy_dependencies(
        _fake_mvn(tmp_path, 0, exit_code=3),
        _context(tmp_path, echoed),
        tmp_path / "out",  # type: ignore[arg-type]
    )
    assert (code, echoed) == (3, [])
    assert "Scanning for projects" in output
