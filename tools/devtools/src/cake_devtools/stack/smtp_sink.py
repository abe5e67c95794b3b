"""The local SMTP server notifications sends e-mail to: ``cake-notifications smtp-sink``
(aiosmtpd), storing each message it receives as one ``.eml`` file under
``.run/<profile>/mail/``. It stands in for the real mail server of a deployment."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Sequence
from pathlib import Path

from cake_devtools.stack.component import ProcessComponent
from cake_devtools.stack.errors import StackError


def smtp_greets(port: int, host: str = "127.0.0.1") -> bool:
    """The server answers with an SMTP ``220`` greeting."""
    try:
        with socket.create_connection((host, port), timeout=1) as connection:
            connection.settimeout(1)
            return connection.recv(3) == b"220"
    except OSError:
        return False


class SmtpSinkComponent(ProcessComponent):
    name = "smtp-sink"
    port_field = "smtp_sink_port"

    @property
    def mail_dir(self) -> Path:
        return self.ctx.layout.root / "mail"

    def command(self) -> Sequence[str]:
        uv = shutil.which("uv")
        if uv is None:
            raise StackError("uv not found on PATH; run tools/bootstrap.sh")
        repo = str(self.ctx.layout.repo)
        return [
            uv,
            "run",
            "--frozen",
            "--directory",
            repo,
            "cake-notifications",
            "smtp-sink",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--directory",
            str(self.mail_dir),
        ]

    def prepare(self) -> None:
        self.mail_dir.mkdir(parents=True, exist_ok=True)

    def probe(self) -> bool:
        return smtp_greets(self.port)

    def wait_ready(self, deadline: float) -> None:
        self.wait_until(self.probe, what="SMTP greeting", deadline=deadline, alive=self.alive)
