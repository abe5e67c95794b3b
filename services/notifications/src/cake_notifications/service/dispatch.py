"""Deliveries out: claim due deliveries (a lease, no transaction open while sending), render
each in the user's language, hand it to its channel, record the outcome.

At-least-once towards the channel, exactly-once in effect: a delivery is marked sent only
after its channel took it; a send that fails transiently (SMTP server down) is tried again
after the retry policy's backoff, for as long as it takes, and never dropped; a dispatcher
that dies mid-send loses its lease and another one sends again with the SAME message id
(the e-mail's Message-ID is the delivery id), so the receiving side can tell a repeat.

Two ways in: the consumer's commit hands its new deliveries over already claimed
(:meth:`Dispatcher.hand_off`, sent at once, no claim to wait for), and the dispatch loops
claim whatever else is due (retries, a lost lease, deliveries left pending when too many
were in hand). Each delivery goes its own way (contacts, render, send) and its outcome is
recorded as soon as it is known, the outcomes that arrive meanwhile written together (one
transaction); no delivery waits for the rest of a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
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

NO_CONTACT = "no_contact"
"""Why a delivery is skipped: the user has no address on its channel (no phone, no push
token)."""
UNKNOWN_USER = "unknown_user"
"""Why a delivery is skipped: auth does not know the user (e.g. the account was deleted)."""

BUSY_WAIT_SECONDS = 0.05
"""The shortest idle sleep (see ``Dispatcher._idle_seconds``)."""

RECORD_ATTEMPTS = 3
"""Tries at writing outcomes (the database down): after that the leases run out and the
deliveries are sent again (same Message-ID), never lost."""


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
        workers: int = 1,
        lease_seconds: float = 60.0,
        idle_poll_seconds: float = 10.0,
        max_in_hand: int = 500,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._uow_factory = uow_factory
        self._directory = directory
        self._renderer = renderer
        self._senders = senders
        self._metrics = metrics
        self._retry = retry
        self._batch_size = batch_size
        self._workers = workers
        self._slots = {channel: asyncio.Semaphore(concurrency) for channel in Channel}
        """Messages being sent at once, per channel: e-mails waiting for the mail server
        must not hold up SMS waiting for theirs, nor the other way round (with one shared
        limit, SMS and push messages queued for the recorder's writes held most of it and
        e-mails waited seconds for a turn under load: bench/notifications.py)."""
        self._lease_seconds = lease_seconds
        self._idle_poll_seconds = idle_poll_seconds
        self._clock = clock
        self._idle: list[asyncio.Event] = []
        """The sleeping loops' wake-up events (the most recently idle last)."""
        self._missed_wake = False
        """Woken while no loop slept: the next loop to go idle claims again first."""
        self._stopping = asyncio.Event()
        self._warming: set[asyncio.Task[None]] = set()
        self._warm_slots = asyncio.Semaphore(16)
        """At most this many lookups ahead of the claims at once."""
        self._tasks: list[asyncio.Task[None]] = []
        self._max_in_hand = max_in_hand
        self._handed: set[asyncio.Task[None]] = set()
        """Deliveries handed over by a commit, each on its way out."""
        self._lookups: dict[int, asyncio.Future[Contacts | TransientSendError | None]] = {}
        """Contact lookups in flight, by user: a user's deliveries (one per channel) and
        the warm-up share one call to auth."""
        self._unrecorded: list[tuple[Delivery, Outcome, datetime, asyncio.Future[None]]] = []
        self._recording = asyncio.Lock()

    def wake(self, user_ids: Collection[int] = ()) -> None:
        """New deliveries were committed: one sleeping loop claims them now (it wakes
        another if it finds a full batch); if none sleeps, a busy one claims again before
        sleeping. Waking every loop for each commit made all but one claim nothing.

        ``user_ids``: whose deliveries they are. Their contacts are looked up now, in the
        background, so the lookup (a call to auth per new user) runs while the deliveries
        wait for a loop instead of after the claim: under load the wait for a claim was
        the longest step, and the lookups made each batch longer."""
        self.look_up_contacts(user_ids)
        if self._idle:
            self._idle.pop().set()
        else:
            self._missed_wake = True

    def prepare(self, user_ids: Collection[int]) -> None:
        """A commit of these users' deliveries is under way: look their contacts up now,
        so the calls to auth run while it commits."""
        if self._tasks:
            self.look_up_contacts(user_ids)

    def lease_for(self, count: int) -> datetime | None:
        """A lease for ``count`` deliveries a commit is about to hand over; None when
        stopping, not started, or with too many in hand already (they stay pending and the
        loops claim them: a backlog held in memory would outlive its leases)."""
        if self._stopping.is_set() or not self._tasks:
            return None
        if self._handed and len(self._handed) + count > self._max_in_hand:
            return None
        return self._clock() + timedelta(seconds=self._lease_seconds)

    def hand_off(
        self, deliveries: Sequence[tuple[Delivery, Preferences]], lease_until: datetime
    ) -> None:
        """Send these deliveries, committed already claimed until ``lease_until``, now.
        While stopping they are left to their leases (sent once those run out)."""
        if self._stopping.is_set():
            return
        for delivery, preferences in deliveries:
            task = asyncio.create_task(self._handed_delivery(delivery, preferences, lease_until))
            self._handed.add(task)
            task.add_done_callback(self._handed.discard)

    async def _handed_delivery(
        self, delivery: Delivery, preferences: Preferences, lease_until: datetime
    ) -> None:
        try:
            await self._send_and_record(delivery, preferences, lease_until)
        except Exception as error:  # its lease runs out and a loop sends it: nothing lost
            _log.warning(
                "delivery not dispatched, left to its lease",
                delivery_id=str(delivery.id),
                error=repr(error),
            )

    def look_up_contacts(self, user_ids: Collection[int]) -> None:
        """Look these users' contacts up in the background (at most 16 at once)."""
        if user_ids and not self._stopping.is_set():
            task = asyncio.create_task(self._warm(list(user_ids)))
            self._warming.add(task)
            task.add_done_callback(self._warming.discard)

    def start(self) -> None:
        """``workers`` loops, each claiming its own batches (the claims skip each other's
        rows), so one batch's sends and bookkeeping do not hold up the next."""
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._loop(), name=f"cake-notifications-dispatcher-{n}")
                for n in range(self._workers)
            ]

    async def stop(self) -> None:
        self._stopping.set()
        for event in self._idle:
            event.set()
        for task in [*self._warming]:
            task.cancel()
        # Deliveries on their way out finish (within the channel's timeout) and are recorded.
        for task in [*self._tasks, *self._warming, *self._handed]:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def is_running(self) -> bool:
        return bool(self._tasks) and not any(task.done() for task in self._tasks)

    async def _loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                handled = await self.run_once()
                # A full batch: more may be due, claim again at once. Otherwise sleep until
                # woken or until the next pending delivery is due (a retry, a lost lease).
                pause = 0.0 if handled >= self._batch_size else await self._idle_seconds()
                failures = 0
            except Exception as error:  # the database is down: keep trying, nothing is lost
                failures += 1
                _log.warning("dispatching failed, retrying", error=repr(error))
                await self._wait(self._retry.delay(failures))
                continue
            if pause > 0:
                await self._wait(pause)

    async def _idle_seconds(self) -> float:
        """How long an idle loop sleeps unless woken: until the earliest pending delivery is
        due, at least ``BUSY_WAIT_SECONDS`` (due rows another loop holds locked for a moment
        must not make it spin) and at most the fallback poll (deliveries another replica
        committed and did not send: it crashed first)."""
        async with self._uow_factory() as uow:
            due = await uow.deliveries.next_due()
        if due is None:
            return self._idle_poll_seconds
        seconds = (due - self._clock()).total_seconds()
        return min(max(seconds, BUSY_WAIT_SECONDS), self._idle_poll_seconds)

    async def _wait(self, seconds: float) -> None:
        if self._missed_wake or self._stopping.is_set():
            self._missed_wake = False
            return
        event = asyncio.Event()
        self._idle.append(event)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=seconds)
        finally:
            if event in self._idle:
                self._idle.remove(event)

    async def run_once(self) -> int:
        """Claim the due deliveries and send them; how many were claimed.

        One transaction claims and reads the users' preferences; then each delivery goes
        its own way (contacts, send) and is recorded as soon as it is done, together with
        whatever else finished meanwhile (:meth:`_record_soon`); returns when all are.
        """
        now = self._clock()
        async with self._uow_factory() as uow:
            claimed = await uow.deliveries.claim_due(now, self._batch_size, self._lease_seconds)
            users = sorted({delivery.user_id for delivery in claimed})
            preferences = await uow.preferences.get_many(users) if users else {}
            await uow.commit()
        if not claimed:
            return 0
        if len(claimed) >= self._batch_size:
            self.wake()  # more may be due: a sleeping loop joins in
        lease_until = now + timedelta(seconds=self._lease_seconds)
        await asyncio.gather(
            *(
                self._send_and_record(
                    delivery,
                    preferences.get(delivery.user_id) or Preferences(delivery.user_id),
                    lease_until,
                )
                for delivery in claimed
            )
        )
        return len(claimed)

    async def _send_and_record(
        self, delivery: Delivery, preferences: Preferences, lease_until: datetime
    ) -> None:
        contacts = await self._contacts(delivery.user_id)
        outcome = await self._deliver(delivery, contacts, preferences, lease_until)
        if outcome is None:
            _log.warning(
                "delivery's lease nearly over before its turn, left for a later claim",
                delivery_id=str(delivery.id),
            )
            return
        await self._record_soon(delivery, outcome, self._clock())

    async def _warm(self, user_ids: list[int]) -> None:
        """Look contacts up ahead of the claim (the directory caches them); a failure
        here is only a lookup the dispatch will make again."""

        async def one(user_id: int) -> None:
            async with self._warm_slots:
                await self._contacts(user_id)

        await asyncio.gather(*(one(user) for user in user_ids), return_exceptions=True)

    async def _contacts(self, user_id: int) -> Contacts | TransientSendError | None:
        """The user's contacts, one lookup at a time per user (asyncio futures shared by
        the callers; hand-written: a dict and a callback, not worth a dependency)."""
        lookup = self._lookups.get(user_id)
        if lookup is None:
            lookup = asyncio.ensure_future(self._lookup(user_id))
            self._lookups[user_id] = lookup

            def forget(done: asyncio.Future[Contacts | TransientSendError | None]) -> None:
                if self._lookups.get(user_id) is done:
                    del self._lookups[user_id]
                if not done.cancelled():
                    done.exception()  # retrieved: every waiter may have gone

            lookup.add_done_callback(forget)
        return await asyncio.shield(lookup)

    async def _lookup(self, user_id: int) -> Contacts | TransientSendError | None:
        try:
            return await self._directory.contacts(user_id)
        except TransientSendError as error:
            return error

    async def _deliver(
        self,
        delivery: Delivery,
        contacts: Contacts | TransientSendError | None,
        preferences: Preferences,
        lease_until: datetime,
    ) -> Outcome | None:
        """Its attempt, or None without one when less than half its lease is left by the
        time a sending slot is free: the send (the channel's timeouts) must end within the
        lease, else a loop would claim and send it a second time meanwhile."""
        async with self._slots[delivery.channel]:
            left = (lease_until - self._clock()).total_seconds()
            if left < self._lease_seconds / 2:
                return None
            with start_span_from_traceparent(
                f"notifications send {delivery.channel.value}",
                delivery.trace_parent,
                attributes={"cake.delivery_id": str(delivery.id)},
            ):
                return await self._attempt(delivery, contacts, preferences)

    async def _attempt(
        self,
        delivery: Delivery,
        contacts: Contacts | TransientSendError | None,
        preferences: Preferences,
    ) -> Outcome:
        if isinstance(contacts, TransientSendError):
            return Outcome(retry=str(contacts))
        if contacts is None:
            return Outcome(skipped=UNKNOWN_USER)
        message = self._message(delivery, contacts, preferences)
        if message is None:
            return Outcome(skipped=NO_CONTACT)
        try:
            await self._senders[delivery.channel].send(message)
        except TransientSendError as error:
            return Outcome(retry=str(error))
        except PermanentSendError as error:
            return Outcome(failed=str(error))
        return Outcome()

    def _message(
        self, delivery: Delivery, contacts: Contacts, preferences: Preferences
    ) -> OutgoingMessage | None:
        to = recipient(delivery.channel, contacts)
        if not to:
            return None
        language = preferences.language_or(contacts.language)
        values = {**delivery.facts, "fullname": contacts.fullname}
        rendered = self._renderer.render(delivery.kind, language, delivery.channel.value, values)
        return OutgoingMessage(delivery.id, delivery.channel, to, rendered.subject, rendered.body)

    async def _record_soon(self, delivery: Delivery, outcome: Outcome, at: datetime) -> None:
        """Record the outcome (``at``: when it was known), in one transaction with every
        other outcome that arrived while the previous write ran (a group commit); returns
        once it is committed. A transaction per delivery was most of the dispatcher's
        database work in a burst, and one per claimed batch made each delivery wait for the
        slowest of its batch."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._unrecorded.append((delivery, outcome, at, done))
        async with self._recording:
            if not done.done():
                batch, self._unrecorded = self._unrecorded, []
                try:
                    await self._record(batch)
                except Exception as error:
                    for *_, waiting in batch:
                        if not waiting.done():
                            waiting.set_exception(error)
                else:
                    for *_, waiting in batch:
                        if not waiting.done():
                            waiting.set_result(None)
        await done

    async def _record(
        self, results: list[tuple[Delivery, Outcome, datetime, asyncio.Future[None]]]
    ) -> None:
        for attempt in range(1, RECORD_ATTEMPTS + 1):
            try:
                await self._write_outcomes(results)
                break
            except Exception as error:
                if attempt == RECORD_ATTEMPTS or self._stopping.is_set():
                    raise
                _log.warning("recording outcomes failed, retrying", error=repr(error))
                await asyncio.sleep(self._retry.delay(attempt))
        for delivery, outcome, at, _ in results:
            self._report(delivery, outcome, at)

    async def _write_outcomes(
        self, results: list[tuple[Delivery, Outcome, datetime, asyncio.Future[None]]]
    ) -> None:
        async with self._uow_factory() as uow:
            sent = [(delivery.id, at) for delivery, outcome, at, _ in results if outcome.sent]
            if sent:
                await uow.deliveries.mark_sent(sent)
            for delivery, outcome, at, _ in results:
                if outcome.retry is not None:
                    due = at + timedelta(seconds=self._retry.delay(delivery.attempts))
                    await uow.deliveries.retry_later(delivery.id, due, outcome.retry[:500])
                elif outcome.failed is not None:
                    await uow.deliveries.mark_failed(delivery.id, at, outcome.failed[:500])
                elif outcome.skipped is not None:
                    await uow.deliveries.mark_skipped(delivery.id, at, outcome.skipped)
            await uow.commit()

    def _report(self, delivery: Delivery, outcome: Outcome, now: datetime) -> None:
        if outcome.retry is not None:
            self._metrics.send_retried(delivery.channel)
            _log.warning(
                "delivery not sent, retrying later",
                delivery_id=str(delivery.id),
                channel=delivery.channel.value,
                attempt=delivery.attempts,
                error=outcome.retry,
            )
        elif outcome.failed is not None:
            self._metrics.send_failed(delivery.channel)
            _log.error(
                "delivery failed for good",
                delivery_id=str(delivery.id),
                channel=delivery.channel.value,
                error=outcome.failed,
            )
        elif outcome.skipped is not None:
            # Normal (no phone, no push token): counted, not an error, never retried.
            self._metrics.delivery_skipped(delivery.channel, outcome.skipped)
            _log.debug(
                "delivery skipped",
                delivery_id=str(delivery.id),
                channel=delivery.channel.value,
                reason=outcome.skipped,
            )
        else:
            self._metrics.message_sent(
                delivery.channel,
                delivery.kind,
                max((now - delivery.occurred_at).total_seconds(), 0.0),
            )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one attempt: sent (no field set), to retry, failed for good, or
    skipped (nowhere to send it)."""

    retry: str | None = None
    failed: str | None = None
    skipped: str | None = None

    @property
    def sent(self) -> bool:
        return self.retry is None and self.failed is None and self.skipped is None
