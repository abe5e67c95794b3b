"""Detached processes and pid files (with ``sleep`` and ``sh`` standing in for servers)."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

from cake_devtools.stack import process


def _spawn(tmp_path: Path, script: str) -> process.ProcessRecord:
    sh = shutil.which("sh")
    assert sh is not None
    return process.spawn(
        [sh, "-c", script],
        log_path=tmp_path / "logs" / "proc.log",
        env=os.environ,
        pid_file=tmp_path / "pids" / "proc.json",
    )


def test_spawned_process_leads_its_own_session_and_logs_to_file(tmp_path: Path) -> None:
    record = _spawn(tmp_path, "echo started; echo oops >&2; exec sleep 30")
    try:
        assert os.getsid(record.pid) == record.pid != os.getsid(0)
        assert process.read_record(tmp_path / "pids" / "proc.json") == record
        assert process.wait_gone(record, timeout=0.1) is False
    finally:
        process.terminate(record, grace=5)
    assert not process.is_alive(record)
    log = (tmp_path / "logs" / "proc.log").read_text()
    assert "started" in log and "oops" in log


def test_terminate_escalates_to_sigkill_for_the_whole_group(tmp_path: Path) -> None:
    # A leader that ignores SIGTERM, with a child in its process group.
    record = _spawn(tmp_path, "trap '' TERM; sleep 30 & wait")
    process.terminate(record, grace=0.5)
    assert not process.is_alive(record)
    assert not process.group_alive(record.pid)


def test_stale_and_garbage_pid_files_are_dropped(tmp_path: Path) -> None:
    record = _spawn(tmp_path, "exit 0")
    pid_file = tmp_path / "pids" / "proc.json"
    assert process.wait_gone(record, timeout=5)

    assert process.read_record(pid_file) is None
    assert not pid_file.exists()

    pid_file.write_text("not json")
    assert process.read_record(pid_file) is None
    assert not pid_file.exists()


def test_a_recycled_pid_is_not_mistaken_for_ours() -> None:
    # Our own pid with another start time: a pid file left from before a reboot.
    ours = process.ProcessRecord(os.getpid(), process._start_ticks(os.getpid()), ())
    recycled = process.ProcessRecord(os.getpid(), (ours.start_ticks or 0) + 1, ())
    assert process.is_alive(ours)
    assert ours.start_ticks is not None, "no /proc start time (Linux only)"
    assert not process.is_alive(recycled)


def test_signal_group_kills_without_waiting(tmp_path: Path) -> None:
    record = _spawn(tmp_path, "exec sleep 30")
    process.signal_group(record, signal.SIGKILL)
    assert process.wait_gone(record, timeout=5)


def test_tail_returns_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert process.tail(log, lines=2) == "line 98\nline 99"
    assert process.tail(tmp_path / "missing.log") == ""
