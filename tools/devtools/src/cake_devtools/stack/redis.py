"""Redis from the OS package, supervised by the stack (or an external server)."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from urllib.parse import urlsplit

from cake_devtools.stack.component import (
    ComponentStatus,
    ProcessComponent,
    State,
    require_binary,
)
from cake_devtools.stack.errors import StackError


def redis_command(redis_server: str, *, port: int, data_dir: str) -> list[str]:
    return [
        redis_server,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        data_dir,
        # A cache and a token denylist: nothing worth persisting between runs.
        "--save",
        "",
        "--appendonly",
        "no",
        # Stay in the foreground: the stack supervises the process, logs go to stdout.
        "--daemonize",
        "no",
        "--logfile",
        "",
    ]


def ping(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


class RedisComponent(ProcessComponent):
    name = "redis"
    port_field = "redis_port"

    @property
    def external_url(self) -> str | None:
        return self.ctx.settings.external_redis_url

    @property
    def url(self) -> str:
        return self.external_url or f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> Sequence[str]:
        binary = require_binary("redis-server", "run tools/bootstrap.sh (apt package redis-server)")
        return redis_command(binary, port=self.port, data_dir=str(self.ctx.layout.redis))

    def prepare(self) -> None:
        self.ctx.layout.redis.mkdir(parents=True, exist_ok=True)

    def probe(self) -> bool:
        return ping(self.url)

    def status(self) -> ComponentStatus:
        if self.external_url:
            # Host and port only: the URL may carry a password.
            parts = urlsplit(self.external_url)
            address = f"{parts.hostname}:{parts.port or 6379}"
            return ComponentStatus(self.name, State.EXTERNAL, self.probe(), address)
        return super().status()

    def start(self) -> None:
        if not self.external_url:
            super().start()

    def wait_ready(self, deadline: float) -> None:
        alive = None if self.external_url else self.alive
        self.wait_until(self.probe, what="PING", deadline=deadline, alive=alive)

    def stop(self) -> None:
        if not self.external_url:
            super().stop()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.external_url:
            raise StackError("redis is external; the stack does not run it")
        super().kill(sig)
