"""Running until told to stop, and closing what was opened: shared by gRPC servers
(:class:`~cake_common.grpc_server.RunningGrpcServer`) and background workers
(:class:`~cake_common.service_runtime.RunningWorker`)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Iterable, Sequence

from cake_common.logging import get_logger

ShutdownHook = Callable[[], Awaitable[None]]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_log = get_logger(__name__)


async def wait_for_stop(
    stop_requested: asyncio.Event, signals: Iterable[signal.Signals] = STOP_SIGNALS
) -> None:
    """Until one of ``signals`` arrives or ``stop_requested`` is set; the handlers are
    removed again afterwards."""
    loop = asyncio.get_running_loop()
    installed = []
    try:
        for sig in signals:
            loop.add_signal_handler(sig, stop_requested.set)
            installed.append(sig)
        await stop_requested.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def run_shutdown_hooks(hooks: Sequence[ShutdownHook]) -> None:
    """Run ``hooks`` in reverse order of registration (close what was opened last first);
    one that fails is logged and does not keep the others from running."""
    for hook in reversed(hooks):
        try:
            await hook()
        except Exception:
            _log.exception("shutdown hook failed", hook=getattr(hook, "__qualname__", repr(hook)))
