"""Prometheus exposition: an HTTP ``/metrics`` endpoint served from a background thread."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from cake_common.logging import get_logger

_log = get_logger(__name__)


@dataclass
class MetricsServer:
    """A running exposition server; :meth:`stop` it on shutdown."""

    host: str
    port: int
    _server: WSGIServer
    _thread: Thread

    async def stop(self) -> None:
        # shutdown() blocks until the serving loop notices (up to its 0.5 s poll).
        await asyncio.to_thread(self._server.shutdown)
        self._server.server_close()
        await asyncio.to_thread(self._thread.join, 5)


def start_metrics_server(
    port: int, host: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY
) -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` (port 0 picks a free port)."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    bound_port = int(server.server_address[1])
    _log.info("metrics endpoint started", address=f"{host}:{bound_port}")
    return MetricsServer(host=host, port=bound_port, _server=server, _thread=thread)
