"""One service in several processes: a supervisor parent and ``count`` worker processes.

Why processes: CPython runs one process's Python code on one core at a time, so a gRPC
service whose per-request cost is Python work (validation, protobuf, token signing, logging)
saturates one core however many the box has. Each worker is a complete server (its own event
loop, database pool, Redis client, revocation follower, hashing threads and admission
control); the supervisor only starts, watches and stops them, and serves their metrics.

Why one endpoint per worker (a Unix socket each, listed as separate endpoints of the
gateway's cluster) and not ``SO_REUSEPORT`` on one TCP port: the kernel spreads *connections*
over reuse-port listeners, and Envoy keeps one long-lived HTTP/2 connection per upstream host
and Envoy thread, so with a shared port all the gateway's traffic can land on one worker. With
one endpoint per worker Envoy balances every request, health-checks every worker on its own
(a worker that is down or NOT_SERVING gets no traffic) and needs no extra TCP ports. Worker 0
also listens on the service's TCP port (for direct gRPC callers and probes), without
``SO_REUSEPORT``, so a port clash with another process still fails loudly.

Faults: a worker that exits before it reported ready fails the whole unit (a configuration
or dependency problem every worker would hit); one that dies later is restarted, unless more
than ``max_restarts`` die within ``restart_window_seconds``, which fails the unit. SIGTERM or
SIGINT to the supervisor sends SIGTERM to every worker (each drains gracefully: health
NOT_SERVING, in-flight calls finish) and waits ``grace_seconds`` plus a margin before it
SIGKILLs what is left.

Metrics: prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set here before
the workers start): every worker writes its samples to its own files and the supervisor
serves their aggregate on the metrics port, so counters add up over workers (and over
restarted ones); gauges declare how they aggregate (``multiprocess_mode``).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

from prometheus_client import CollectorRegistry, multiprocess, start_http_server

from cake_common.lifecycle import STOP_SIGNALS
from cake_common.logging import get_logger, set_process_fields

_log = get_logger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

Ready = Callable[[], None]
"""Called by a worker once it serves (its gRPC server started and health SERVING)."""
WorkerTarget = Callable[[int, Ready], None]
"""A worker's body: ``target(index, ready)`` serves until SIGTERM. It runs in a spawned
process, so it must be picklable (a module-level function or a ``functools.partial`` of one
with picklable arguments)."""


class WorkerPoolError(RuntimeError):
    """The unit cannot serve: a worker failed to start or workers keep dying."""


def worker_socket_path(socket_dir: Path, service: str, index: int) -> Path:
    """Where worker ``index`` of ``service`` listens: ``<socket_dir>/<service>-<index>.sock``
    (the gateway config lists the same paths as the cluster's endpoints)."""
    return socket_dir / f"{service}-{index}.sock"


def refuse_sockets_in_use(paths: Iterable[Path]) -> None:
    """Fail when another live process serves on one of ``paths``.

    gRPC replaces the socket file it binds, so a second server started with the same socket
    directory would silently take every path from the one already serving there (and delete
    them when it stops). A file nobody accepts on is a dead server's leftover: replacing it
    is right."""
    for path in paths:
        if not path.exists():
            continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(str(path))
            except OSError:
                continue
        raise WorkerPoolError(
            f"{path} is served by another running process: stop it, or give this one its "
            "own socket directory"
        )


def multiprocess_metrics() -> bool:
    """This process is a worker whose metrics the supervisor serves (multiprocess mode)."""
    return bool(os.environ.get(MULTIPROC_ENV))


@dataclass(frozen=True)
class WorkerPool:
    name: str
    count: int
    target: WorkerTarget
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    grace_seconds: float = 10.0
    max_restarts: int = 5
    restart_window_seconds: float = 60.0
    kill_margin_seconds: float = 3.0


def _watch_parent(parent_pid: int) -> None:
    # A worker must never outlive its supervisor (it would keep its socket and database
    # connections): when the parent is gone the worker is re-parented, and stops itself.
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)


def _worker_main(target: WorkerTarget, index: int, ready_pipe: Connection, parent_pid: int) -> None:
    set_process_fields(worker=index)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()

    def ready() -> None:
        ready_pipe.send(os.getpid())

    target(index, ready)


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    ready_pipe: Connection
    ready: bool = False


class _Supervisor:
    def __init__(self, pool: WorkerPool, metrics_dir: Path) -> None:
        self._pool = pool
        self._metrics_dir = metrics_dir
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, _Worker] = {}
        self._events: asyncio.Queue[tuple[str, int, int]] = asyncio.Queue()
        self._deaths: deque[float] = deque()
        self._loop = asyncio.get_running_loop()

    def _spawn(self, index: int) -> None:
        reader, writer = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_worker_main,
            args=(self._pool.target, index, writer, os.getpid()),
            name=f"{self._pool.name}-worker-{index}",
        )
        process.start()
        writer.close()
        worker = _Worker(index, process, reader)
        self._workers[index] = worker
        pid = process.pid or 0
        self._loop.add_reader(reader.fileno(), self._on_ready_pipe, worker)
        self._loop.add_reader(process.sentinel, self._on_exit, worker)
        _log.info("worker started", worker=index, pid=pid)

    def _on_ready_pipe(self, worker: _Worker) -> None:
        try:
            pid = worker.ready_pipe.recv()
        except (EOFError, OSError):
            self._loop.remove_reader(worker.ready_pipe.fileno())
            return
        self._events.put_nowait(("ready", worker.index, int(pid)))

    def _on_exit(self, worker: _Worker) -> None:
        self._loop.remove_reader(worker.process.sentinel)
        self._events.put_nowait(("exit", worker.index, worker.process.pid or 0))

    def _forget(self, worker: _Worker) -> None:
        worker.process.join(timeout=0)
        with contextlib.suppress(OSError, ValueError):
            self._loop.remove_reader(worker.ready_pipe.fileno())
        worker.ready_pipe.close()
        if worker.process.pid is not None:
            multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                worker.process.pid, str(self._metrics_dir)
            )

    def _handle_exit(self, index: int) -> None:
        worker = self._workers[index]
        # The sentinel closes as the process exits, a moment before it can be reaped.
        worker.process.join(timeout=5)
        code = worker.process.exitcode
        self._forget(worker)
        if not worker.ready:
            raise WorkerPoolError(
                f"{self._pool.name} worker {index} exited (code {code}) before it served"
            )
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and now - self._deaths[0] > self._pool.restart_window_seconds:
            self._deaths.popleft()
        if len(self._deaths) > self._pool.max_restarts:
            raise WorkerPoolError(
                f"{self._pool.name}: {len(self._deaths)} workers died within "
                f"{self._pool.restart_window_seconds:.0f}s; giving up"
            )
        _log.error("worker died; restarting it", worker=index, exit_code=code)
        self._spawn(index)

    async def run(self, stop: asyncio.Event) -> None:
        for index in range(self._pool.count):
            self._spawn(index)
        stop_wait = asyncio.ensure_future(stop.wait())
        try:
            while True:
                event_wait = asyncio.ensure_future(self._events.get())
                done, _ = await asyncio.wait(
                    {stop_wait, event_wait}, return_when=asyncio.FIRST_COMPLETED
                )
                if stop_wait in done:
                    event_wait.cancel()
                    return
                kind, index, pid = event_wait.result()
                if kind == "ready":
                    self._workers[index].ready = True
                    _log.info("worker serving", worker=index, pid=pid)
                    if all(w.ready for w in self._workers.values()):
                        _log.info("all workers serving", workers=self._pool.count)
                else:
                    self._handle_exit(index)
        finally:
            stop_wait.cancel()

    async def stop_all(self) -> None:
        """SIGTERM every worker, wait for them (grace + margin), SIGKILL what is left."""
        alive = [w for w in self._workers.values() if w.process.exitcode is None]
        for worker in alive:
            self._loop.remove_reader(worker.process.sentinel)
            if worker.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self._pool.grace_seconds + self._pool.kill_margin_seconds
        for worker in alive:
            remaining = max(0.0, deadline - time.monotonic())
            await asyncio.to_thread(worker.process.join, remaining)
            if worker.process.exitcode is None:
                _log.error("worker did not stop in time; killing it", worker=worker.index)
                worker.process.kill()
                await asyncio.to_thread(worker.process.join, 5)
            _log.info("worker stopped", worker=worker.index, exit_code=worker.process.exitcode)
        for worker in self._workers.values():
            self._forget(worker)


async def supervise(pool: WorkerPool) -> None:
    """Run ``pool`` until SIGTERM/SIGINT (then stop every worker gracefully and return), or
    raise :class:`WorkerPoolError` (after stopping the rest) when the unit cannot serve."""
    if pool.count < 1:
        raise ValueError("a worker pool needs at least one worker")
    metrics_dir = Path(tempfile.mkdtemp(prefix=f"cake-{pool.name}-metrics-"))
    os.environ[MULTIPROC_ENV] = str(metrics_dir)
    metrics_server = None
    if pool.metrics_port is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(metrics_dir))  # type: ignore[no-untyped-call]
        metrics_server = start_http_server(
            pool.metrics_port, addr=pool.metrics_host, registry=registry
        )
        _log.info(
            "metrics endpoint started (all workers)",
            address=f"{pool.metrics_host}:{pool.metrics_port}",
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    supervisor = _Supervisor(pool, metrics_dir)
    try:
        await supervisor.run(stop)
        _log.info("stopping workers", workers=pool.count)
    finally:
        await supervisor.stop_all()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        if metrics_server is not None:
            server, thread = metrics_server
            server.shutdown()
            server.server_close()
            thread.join(5)
        del os.environ[MULTIPROC_ENV]
        shutil.rmtree(metrics_dir, ignore_errors=True)
