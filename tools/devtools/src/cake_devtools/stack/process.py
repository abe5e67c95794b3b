"""Detached processes with pid files that survive the command that started them.

``make up`` must return while the servers keep running, and a later ``cake-stack down`` (or the
next test session) must find them again without mistaking a recycled pid for ours. So each
process gets its own session (it is the leader of its process group, and a Ctrl-C in the shell
that ran ``make up`` does not reach it) and a pid file holding the pid plus the process start
time read from ``/proc``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Python ignores SIGPIPE (and SIGXFSZ) and children inherit ignored signals across exec;
# servers must get the default dispositions back, as subprocess's restore_signals does.
_RESET_SIGNALS = (
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
)


@dataclass(frozen=True)
class ProcessRecord:
    """What a pid file stores."""

    pid: int
    #: Start time in clock ticks since boot (``/proc/<pid>/stat`` field 22); None off Linux.
    start_ticks: int | None
    argv: tuple[str, ...]


def spawn(
    argv: Sequence[str], *, log_path: Path, env: Mapping[str, str], pid_file: Path
) -> ProcessRecord:
    """Start ``argv`` in a new session, stdout+stderr appended to ``log_path``.

    ``argv[0]`` must be an absolute path (resolved by the caller, so a missing binary is
    reported by name instead of as a failed exec in the child). The child is not waited for.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # posix_spawn rather than subprocess.Popen: no Popen object is left to warn "still
    # running" when garbage collected, the child simply outlives us.
    pid = os.posix_spawn(
        argv[0],
        list(argv),
        dict(env),
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(log_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
        setsid=True,
        setsigdef=_RESET_SIGNALS,
    )
    record = ProcessRecord(pid=pid, start_ticks=_start_ticks(pid), argv=tuple(argv))
    write_record(pid_file, record)
    return record


def write_record(pid_file: Path, record: ProcessRecord) -> None:
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    payload = {"pid": record.pid, "start_ticks": record.start_ticks, "argv": list(record.argv)}
    tmp = pid_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload) + "\n", encoding="utf-8")
    tmp.replace(pid_file)


def read_record(pid_file: Path) -> ProcessRecord | None:
    """The record of a live process, or None (a stale pid file is removed)."""
    try:
        payload = json.loads(pid_file.read_text(encoding="utf-8"))
        record = ProcessRecord(
            pid=int(payload["pid"]),
            start_ticks=None if payload.get("start_ticks") is None else int(payload["start_ticks"]),
            argv=tuple(str(arg) for arg in payload.get("argv", ())),
        )
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        pid_file.unlink(missing_ok=True)
        return None
    if not is_alive(record):
        pid_file.unlink(missing_ok=True)
        return None
    return record


def is_alive(record: ProcessRecord) -> bool:
    """True if the recorded process still runs (not a zombie, not a recycled pid)."""
    _reap(record.pid)
    ticks = _start_ticks(record.pid)
    if ticks is not None:
        return record.start_ticks is None or ticks == record.start_ticks
    if Path("/proc/self/stat").exists():
        return False  # Linux, and /proc/<pid> is gone or a zombie
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_alive(pgid: int) -> bool:
    """True while any process of the group runs (``uv run`` wrappers have children)."""
    _reap(pgid)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) also succeeds for zombies; a group whose only member is a zombie is gone.
    if Path("/proc/self/stat").exists():
        return any(_live_member(entry, pgid) for entry in Path("/proc").iterdir())
    return True


def group_members(pgid: int) -> list[int]:
    """The live processes of the group ``pgid`` (a component: its ``uv run`` wrapper, the
    server, and the worker processes of a service that runs several) and their descendants
    (PostgreSQL's backends), by pid."""
    parents: dict[int, int] = {}
    members = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None or fields[0] == "Z":
            continue
        parents[int(entry.name)] = int(fields[1])
        if int(fields[2]) == pgid:
            members.add(int(entry.name))
    grown = True
    while grown:
        children = {pid for pid, parent in parents.items() if parent in members}
        grown = not children <= members
        members |= children
    return sorted(members)


def cpu_ticks(pid: int) -> int | None:
    """User + system CPU time ``pid`` has used, in clock ticks (``os.sysconf("SC_CLK_TCK")``
    per second), from ``/proc/<pid>/stat``; ``None`` once it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return int(fields[11]) + int(fields[12])  # utime and stime: fields 14 and 15 overall


def process_name(pid: int) -> str:
    """A short name for ``pid``: its command line's most telling words."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    words = [w for w in raw.decode(errors="replace").split("\0") if w]
    if any("multiprocessing-fork" in w for w in words):
        return "worker"
    if any("resource_tracker" in w for w in words):
        return "resource-tracker"
    return " ".join(Path(words[0]).name if i == 0 else w for i, w in enumerate(words[:3]))


def signal_group(record: ProcessRecord, sig: int) -> None:
    """Send ``sig`` to the whole process group the record leads."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(record.pid, sig)


def terminate(record: ProcessRecord, *, grace: float) -> None:
    """SIGTERM the leader (wrappers such as ``uv run`` forward it), SIGKILL the group after
    ``grace`` seconds, and wait until every member is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not is_alive(record) and not group_alive(record.pid):
            return
        time.sleep(0.1)
    signal_group(record, signal.SIGKILL)
    wait_gone(record, timeout=10)


def wait_gone(record: ProcessRecord, *, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(record) and not group_alive(record.pid):
            return True
        time.sleep(0.05)
    return False


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file (empty if it does not exist)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            data = handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _reap(pid: int) -> None:
    # Our own children stay zombies until waited for (the test session is long-lived).
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces.
    return raw[raw.rindex(")") + 2 :].split()


def _start_ticks(pid: int) -> int | None:
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return None
    return int(fields[19])  # field 22 overall; fields[0] is field 3 (state)


def _live_member(entry: Path, pgid: int) -> bool:
    if not entry.name.isdigit():
        return False
    fields = _stat_fields(int(entry.name))
    return fields is not None and fields[0] != "Z" and int(fields[2]) == pgid
