"""The SMTP sink of the local stack and the dev cluster: a real SMTP server (aiosmtpd) that
stores every message it receives as one ``.eml`` file, named after its Message-ID, in a
directory (a repeat of one Message-ID shows as a second ``<id>.<n>.eml`` file, so drills
can count duplicates). Not for production: it accepts any sender and recipient."""

from __future__ import annotations

import asyncio
import hashlib
import signal
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller


def stored_name(message_id: str, directory: Path) -> Path:
    stem = hashlib.sha256(message_id.encode()).hexdigest()[:32] if message_id else "no-id"
    candidate = directory / f"{stem}.eml"
    n = 1
    while candidate.exists():
        candidate = directory / f"{stem}.{n}.eml"
        n += 1
    return candidate


_HEADERS = BytesHeaderParser(policy=compat32)
"""Reads the headers only, as they are: the sink needs the Message-ID, nothing else (parsing
the whole message with the modern policy was most of its CPU time per message, py-spy on
bench/notifications.py, while notifications waited on its answers)."""


class StoringHandler:
    def __init__(self, directory: Path) -> None:
        self._directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        content: bytes = envelope.original_content or envelope.content
        message_id = _HEADERS.parsebytes(content).get("Message-ID", "")
        target = stored_name(str(message_id).strip(), self._directory)
        partial = target.with_suffix(".part")
        partial.write_bytes(content)
        partial.rename(target)  # whole files only: a reader never sees half a message
        return "250 Message accepted for delivery"


async def serve_sink(host: str, port: int, directory: Path) -> None:
    """Serve until SIGTERM/SIGINT."""
    controller = Controller(StoringHandler(directory), hostname=host, port=port)
    controller.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"smtp sink listening on {host}:{port}, storing into {directory}", flush=True)
    try:
        await stop.wait()
    finally:
        controller.stop()
