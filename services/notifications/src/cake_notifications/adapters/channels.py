"""The channels: e-mail over SMTP (aiosmtplib), SMS and push through a recorder.

The SMS and push port has no provider yet: :class:`RecordingSender` keeps each message in
the ``recorded_messages`` table (one row per delivery, so a repeat is no second message);
a provider's adapter implements the same ``ChannelSender`` port.
"""

from __future__ import annotations

import asyncio
import ssl
from email import policy
from email.header import Header
from email.mime.text import MIMEText
from email.utils import formataddr, formatdate, parseaddr
from typing import cast

import aiosmtplib
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cake_notifications.service.ports import (
    OutgoingMessage,
    PermanentSendError,
    TransientSendError,
)

MESSAGE_ID_DOMAIN = "notifications.cake"


def message_id(message: OutgoingMessage) -> str:
    """The e-mail's Message-ID: the delivery's id, so a resent e-mail is recognisably the same."""
    return f"<{message.delivery_id}@{MESSAGE_ID_DOMAIN}>"


_WIRE = policy.compat32.clone(linesep="\r\n")
"""How a message is written for SMTP: CRLF lines, the compat32 header handling."""


def email_message(message: OutgoingMessage, sender: str) -> bytes:
    """The e-mail as SMTP carries it (UTF-8 text, the subject as RFC 2047 encoded words).

    Built with the stdlib's compat32 classes (``MIMEText``, ``Header``) rather than
    ``EmailMessage``: the modern policy parses and refolds every header it is given, which
    measured 4-5x the CPU per e-mail (py-spy on bench/notifications.py: composing and
    flattening e-mails was a fifth of the dispatcher's time). ``sender`` is an already
    formatted From header.
    """
    email = MIMEText(message.body, "plain", "utf-8")
    email["From"] = sender
    email["To"] = message.recipient
    # compat32 takes a Header and folds its encoded words itself (typeshed says str only).
    email["Subject"] = cast(str, Header(message.subject, "utf-8"))
    email["Message-ID"] = message_id(message)
    email["Date"] = formatdate(usegmt=True)
    return email.as_bytes(policy=_WIRE)


class SmtpSender:
    """E-mail over SMTP on a few kept-open connections (a new connection per message costs a
    handshake each: at a burst's rate that is most of the work). Connection failures,
    timeouts and 4xx answers are transient (the dispatcher retries with backoff); a 5xx
    refusal of the recipient or message is permanent.

    The pool is hand-written (aiosmtplib has none): a queue of idle clients, at most
    ``connections`` of them; a client that failed is closed, never reused.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        sender: str,
        timeout_seconds: float = 10.0,
        username: str | None = None,
        password: str | None = None,
        start_tls: bool = False,
        tls_context: ssl.SSLContext | None = None,
        connections: int = 8,
    ) -> None:
        self._host = host
        self._port = port
        # The From header (a display name in UTF-8 encoded as RFC 2047 requires) and the
        # envelope's sender address, worked out once.
        self._sender = formataddr(parseaddr(sender), charset="utf-8")
        self._envelope_sender = parseaddr(sender)[1]
        self._timeout = timeout_seconds
        self._username = username
        self._password = password
        self._start_tls = start_tls
        self._tls_context = tls_context
        self._idle: asyncio.LifoQueue[aiosmtplib.SMTP] = asyncio.LifoQueue()
        self._slots = asyncio.Semaphore(connections)

    async def send(self, message: OutgoingMessage) -> None:
        email = email_message(message, self._sender)
        async with self._slots:
            client = await self._client()
            try:
                # sendmail with the bytes: send_message would parse the addresses back out
                # of the headers and flatten the message a second time.
                await client.sendmail(self._envelope_sender, [message.recipient], email)
            except aiosmtplib.SMTPRecipientsRefused as error:
                self._idle.put_nowait(client)  # the connection itself is fine
                if all(500 <= refusal.code < 600 for refusal in error.recipients):
                    raise PermanentSendError(f"recipient refused: {error}") from error
                raise TransientSendError(f"recipient deferred: {error}") from error
            except aiosmtplib.SMTPResponseException as error:
                await self._discard(client)
                if 500 <= error.code < 600:
                    raise PermanentSendError(f"SMTP {error.code}: {error.message}") from error
                raise TransientSendError(f"SMTP {error.code}: {error.message}") from error
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
                await self._discard(client)
                raise TransientSendError(f"SMTP server unreachable: {error!r}") from error
            self._idle.put_nowait(client)

    async def _client(self) -> aiosmtplib.SMTP:
        while not self._idle.empty():
            client = self._idle.get_nowait()
            if client.is_connected:
                return client
        client = aiosmtplib.SMTP(
            hostname=self._host,
            port=self._port,
            timeout=self._timeout,
            username=self._username,
            password=self._password,
            start_tls=self._start_tls,
            tls_context=self._tls_context,
        )
        try:
            await client.connect()
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            raise TransientSendError(f"SMTP server unreachable: {error!r}") from error
        return client

    @staticmethod
    async def _discard(client: aiosmtplib.SMTP) -> None:
        client.close()

    async def close(self) -> None:
        while not self._idle.empty():
            client = self._idle.get_nowait()
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                client.close()


_RECORD = sa.text(
    """
INSERT INTO recorded_messages (delivery_id, channel, recipient, subject, body)
SELECT * FROM unnest(
    CAST(:ids AS uuid[]), CAST(:channels AS text[]), CAST(:recipients AS text[]),
    CAST(:subjects AS text[]), CAST(:bodies AS text[])
)
ON CONFLICT (delivery_id) DO NOTHING
"""
)
"""The recorder's write: one statement whatever the number of messages (a multi-row VALUES
was compiled again for every new count of rows)."""


class RecordingSender:
    """SMS or push, recorded in the database instead of sent (no provider yet).

    Messages sent at the same time are written together (one INSERT, one commit for all
    that arrived while the previous write ran): one transaction per message was most of the
    dispatcher's work in a burst. Each caller still returns only once its row is committed.
    """

    def __init__(self, session_factory: async_sessionmaker[AsyncSession]) -> None:
        self._session_factory = session_factory
        self._pending: list[tuple[OutgoingMessage, asyncio.Future[None]]] = []
        self._writing = asyncio.Lock()

    async def send(self, message: OutgoingMessage) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((message, done))
        async with self._writing:
            if not done.done():
                batch, self._pending = self._pending, []
                await self._write(batch)
        await done

    async def _write(self, batch: list[tuple[OutgoingMessage, asyncio.Future[None]]]) -> None:
        messages = [message for message, _ in batch]
        parameters = {
            "ids": [m.delivery_id for m in messages],
            "channels": [m.channel.value for m in messages],
            "recipients": [m.recipient for m in messages],
            "subjects": [m.subject for m in messages],
            "bodies": [m.body for m in messages],
        }
        try:
            async with self._session_factory() as session:
                await session.execute(_RECORD, parameters)
                await session.commit()
        except Exception as error:
            failure = (
                TransientSendError(repr(error)[:300])
                if isinstance(error, OSError | SQLAlchemyError)
                else error
            )
            for _, done in batch:
                if not done.done():
                    done.set_exception(failure)
            return
        for _, done in batch:
            if not done.done():
                done.set_result(None)
