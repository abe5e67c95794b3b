"""The channels: e-mail over SMTP (aiosmtplib), SMS and push through a recorder.

The SMS and push port has no provider yet: :class:`RecordingSender` keeps each message in
the ``recorded_messages`` table (one row per delivery, so a repeat is no second message);
a provider's adapter implements the same ``ChannelSender`` port.
"""

from __future__ import annotations

import ssl
from email.message import EmailMessage
from email.utils import formatdate

import aiosmtplib
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cake_notifications.adapters.tables import recorded_messages
from cake_notifications.service.ports import (
    OutgoingMessage,
    PermanentSendError,
    TransientSendError,
)

MESSAGE_ID_DOMAIN = "notifications.cake"


def message_id(message: OutgoingMessage) -> str:
    """The e-mail's Message-ID: the delivery's id, so a resent e-mail is recognisably the same."""
    return f"<{message.delivery_id}@{MESSAGE_ID_DOMAIN}>"


def email_message(message: OutgoingMessage, sender: str) -> EmailMessage:
    email = EmailMessage()
    email["From"] = sender
    email["To"] = message.recipient
    email["Subject"] = message.subject
    email["Message-ID"] = message_id(message)
    email["Date"] = formatdate(usegmt=True)
    email.set_content(message.body)
    return email


class SmtpSender:
    """E-mail over SMTP. Connection failures, timeouts and 4xx answers are transient (the
    dispatcher retries with backoff); a 5xx refusal of the recipient or message is permanent."""

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
    ) -> None:
        self._host = host
        self._port = port
        self._sender = sender
        self._timeout = timeout_seconds
        self._username = username
        self._password = password
        self._start_tls = start_tls
        self._tls_context = tls_context

    async def send(self, message: OutgoingMessage) -> None:
        try:
            await aiosmtplib.send(
                email_message(message, self._sender),
                hostname=self._host,
                port=self._port,
                timeout=self._timeout,
                username=self._username,
                password=self._password,
                start_tls=self._start_tls,
                tls_context=self._tls_context,
            )
        except aiosmtplib.SMTPRecipientsRefused as error:
            if all(500 <= refusal.code < 600 for refusal in error.recipients):
                raise PermanentSendError(f"recipient refused: {error}") from error
            raise TransientSendError(f"recipient deferred: {error}") from error
        except aiosmtplib.SMTPResponseException as error:
            if 500 <= error.code < 600:
                raise PermanentSendError(f"SMTP {error.code}: {error.message}") from error
            raise TransientSendError(f"SMTP {error.code}: {error.message}") from error
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            raise TransientSendError(f"SMTP server unreachable: {error!r}") from error


class RecordingSender:
    """SMS or push, recorded in the database instead of sent (no provider yet)."""

    def __init__(self, session_factory: async_sessionmaker[AsyncSession]) -> None:
        self._session_factory = session_factory

    async def send(self, message: OutgoingMessage) -> None:
        statement = (
            pg_insert(recorded_messages)
            .values(
                delivery_id=message.delivery_id,
                channel=message.channel.value,
                recipient=message.recipient,
                subject=message.subject,
                body=message.body,
            )
            .on_conflict_do_nothing(index_elements=[recorded_messages.c.delivery_id])
        )
        try:
            async with self._session_factory() as session:
                await session.execute(statement)
                await session.commit()
        except OSError as error:
            raise TransientSendError(repr(error)) from error
