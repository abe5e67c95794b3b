"""Deliveries out: claim due deliveries (a lease, no transaction open while sending), render
each in the user's language, hand it to its channel, record the outcome.

At-least-once towards the channel, exactly-once in effect: a delivery is marked sent only
after its channel took it; a send that fails transiently (SMTP server down) is tried again
after the retry policy's backoff, for as long as it takes, and never dropped; a dispatcher
that dies mid-send loses its lease and another one sends again with the SAME message id
(the e-mail's Message-ID is the delivery id), so the receiving side can tell a repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta

from cake_common.logging import get_logger
from cake_common.retry import RetryPolicy
from cake_common.tracing import start_span_from_traceparent

from cake_notifications.domain.notifications import Channel, Delivery, Preferences
from cake_notifications.service.ports import (
    ChannelSender,
    ContactDirectory,
    Contacts,
    MessageRenderer,
    NotificationMetrics,
    OutgoingMessage,
    PermanentSendError,
    TransientSendError,
    UnitOfWorkFactory,
)

_log = get_logger(__name__)


def utc_now() -> datetime:
    return datetime.now(UTC)


def recipient(channel: Channel, contacts: Contacts) -> str:
    return contacts.email if channel is Channel.EMAIL else contacts.phone


class Dispatcher:
    def __init__(
        self,
        uow_factory: UnitOfWorkFactory,
        directory: ContactDirectory,
        renderer: MessageRenderer,
        senders: Mapping[Channel, ChannelSender],
        metrics: NotificationMetrics,
        *,
        retry: RetryPolicy,
        batch_size: int = 50,
        concurrency: int = 10,
        lease_seconds: float = 60.0,
        idle_poll_seconds: float = 1.0,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._uow_factory = uow_factory
        self._directory = directory
        self._renderer = renderer
        self._senders = senders
        self._metrics = metrics
        self._retry = retry
        self._batch_size = batch_size
        self._slots = asyncio.Semaphore(concurrency)
        self._lease_seconds = lease_seconds
        self._idle_poll_seconds = idle_poll_seconds
        self._clock = clock
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        """New deliveries were committed: look now instead of at the next poll."""
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="cake-notifications-dispatcher")

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                handled = await self.run_once()
                failures = 0
            except Exception as error:  # the database is down: keep trying, nothing is lost
                failures += 1
                _log.warning("dispatching failed, retrying", error=repr(error))
                await self._wait(self._retry.delay(failures))
                continue
            if handled < self._batch_size:
                await self._wait(self._idle_poll_seconds)

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        self._wake.clear()

    async def run_once(self) -> int:
        """Claim the due deliveries and send them (concurrently); how many were claimed."""
        self._wake.clear()
        async with self._uow_factory() as uow:
            claimed = await uow.deliveries.claim_due(
                self._clock(), self._batch_size, self._lease_seconds
            )
            await uow.commit()
        if claimed:
            await asyncio.gather(*(self._deliver(delivery) for delivery in claimed))
        return len(claimed)

    async def _deliver(self, delivery: Delivery) -> None:
        async with self._slots:
            with start_span_from_traceparent(
                f"notifications send {delivery.channel.value}",
                delivery.trace_parent,
                attributes={"cake.delivery_id": str(delivery.id)},
            ):
                await self._attempt(delivery)

    async def _attempt(self, delivery: Delivery) -> None:
        try:
            message = await self._message(delivery)
            if message is None:
                await self._record(delivery, failed="the user has no contact on this channel")
                return
            await self._senders[delivery.channel].send(message)
        except TransientSendError as error:
            await self._record(delivery, retry=str(error))
            return
        except PermanentSendError as error:
            await self._record(delivery, failed=str(error))
            return
        await self._record(delivery)

    async def _message(self, delivery: Delivery) -> OutgoingMessage | None:
        contacts = await self._directory.contacts(delivery.user_id)
        if contacts is None:
            return None
        to = recipient(delivery.channel, contacts)
        if not to:
            return None
        async with self._uow_factory() as uow:
            preferences = await uow.preferences.get(delivery.user_id)
        chosen = preferences or Preferences(delivery.user_id)
        language = chosen.language_or(contacts.language)
        values = {**delivery.facts, "fullname": contacts.fullname}
        rendered = self._renderer.render(delivery.kind, language, delivery.channel.value, values)
        return OutgoingMessage(delivery.id, delivery.channel, to, rendered.subject, rendered.body)

    async def _record(
        self, delivery: Delivery, *, retry: str | None = None, failed: str | None = None
    ) -> None:
        now = self._clock()
        async with self._uow_factory() as uow:
            if retry is not None:
                due = now + timedelta(seconds=self._retry.delay(delivery.attempts))
                await uow.deliveries.retry_later(delivery.id, due, retry[:500])
            elif failed is not None:
                await uow.deliveries.mark_failed(delivery.id, now, failed[:500])
            else:
                await uow.deliveries.mark_sent(delivery.id, now)
            await uow.commit()
        if retry is not None:
            self._metrics.send_retried(delivery.channel)
            _log.warning(
                "delivery not sent, retrying later",
                delivery_id=str(delivery.id),
                channel=delivery.channel.value,
                attempt=delivery.attempts,
                error=retry,
            )
        elif failed is not None:
            self._metrics.send_failed(delivery.channel)
            _log.error(
                "delivery failed for good",
                delivery_id=str(delivery.id),
                channel=delivery.channel.value,
                error=failed,
            )
        else:
            self._metrics.message_sent(
                delivery.channel,
                delivery.kind,
                max((now - delivery.occurred_at).total_seconds(), 0.0),
            )
