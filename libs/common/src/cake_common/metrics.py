"""Prometheus exposition: an HTTP ``/metrics`` endpoint served from a background thread."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from threading import Thread
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from cake_common.logging import get_logger

_log = get_logger(__name__)

_POLL_SECONDS = 0.05
"""How often the serving loop looks for a stop request: what :meth:`MetricsServer.stop`
waits at most. prometheus_client's ``start_http_server`` serves with the standard library's
default of 0.5 s, which every stop (each test server, each service shutdown) paid in full;
that one argument is why this module builds the server itself from the library's WSGI app
and threading server."""


class _QuietHandler(WSGIRequestHandler):
    """No access-log line on stderr per scrape (prometheus_client's handler does the same)."""

    def log_message(self, format: str, *args: Any) -> None:
        return


@dataclass
class MetricsServer:
    """A running exposition server; :meth:`stop` it on shutdown."""

    host: str
    port: int
    _server: WSGIServer
    _thread: Thread

    async def stop(self) -> None:
        # shutdown() blocks until the serving loop notices (at most _POLL_SECONDS).
        await asyncio.to_thread(self._server.shutdown)
        self._server.server_close()
        await asyncio.to_thread(self._thread.join, 5)


def start_metrics_server(
    port: int, host: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY
) -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` (port 0 picks a free port)."""
    # The address family of ``host`` (an IPv6 host needs AF_INET6), as start_http_server does.
    family, *_, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(ThreadingWSGIServer):
        address_family = family

    server = make_server(
        str(address[0]), port, make_wsgi_app(registry), Server, handler_class=_QuietHandler
    )
    thread = Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": _POLL_SECONDS},
        name="metrics-server",
        daemon=True,
    )
    thread.start()
    bound_port = int(server.server_address[1])
    _log.info("metrics endpoint started", address=f"{host}:{bound_port}")
    return MetricsServer(host=host, port=bound_port, _server=server, _thread=thread)
