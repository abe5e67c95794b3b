from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest
from cake_common.errors import InvalidArgument, NotFound
from cake_common.retry import RetryPolicy
from cake_notifications.adapters.templates import JinjaRenderer
from cake_notifications.bootstrap import TEMPLATE_SAMPLES
from cake_notifications.domain.notifications import Channel, EventFacts, Kind, Language
from cake_notifications.service.dispatch import Dispatcher
from cake_notifications.service.inbox import UserNotifications
from cake_notifications.service.notify import IncomingEvent, NotifyUsers
from cake_notifications.service.ports import (
    Contacts,
    OutgoingMessage,
    PermanentSendError,
    TransientSendError,
)

T0 = datetime(2026, 12, 5, 4, 0, tzinfo=UTC)


def voucher_event(user_id: int = 7, at: datetime = T0) -> IncomingEvent:
    return IncomingEvent(
        EventFacts(uuid4(), user_id, Kind.VOUCHER_ISSUED, at, TEMPLATE_SAMPLES[Kind.VOUCHER_ISSUED])
    )


def notify(fakes) -> tuple[NotifyUsers, list[int]]:  # type: ignore[no-untyped-def]
    wakes: list[int] = []
    use_case = NotifyUsers(
        fakes.uow,
        JinjaRenderer(),
        fakes.metrics,
        lambda _users: wakes.append(1),
        max_event_age=timedelta(hours=24),
        clock=lambda: T0 + timedelta(seconds=1),
    )
    return use_case, wakes


def dispatcher(fakes, clock=lambda: T0) -> Dispatcher:  # type: ignore[no-untyped-def]
    return Dispatcher(
        fakes.uow,
        fakes.directory,
        JinjaRenderer(),
        {Channel.EMAIL: fakes.email, Channel.SMS: fakes.sms, Channel.PUSH: fakes.push},
        fakes.metrics,
        retry=RetryPolicy(base_seconds=1, max_seconds=8),
        clock=clock,
    )


async def test_one_notification_and_one_delivery_per_channel_whatever_the_redeliveries(
    fakes,
) -> None:
    use_case, wakes = notify(fakes)
    event = voucher_event()
    assert await use_case.accept([event, event]) == ["notified", "duplicate"]
    assert await use_case.accept([event]) == ["duplicate"]
    assert len(fakes.store.notifications) == 1
    assert sorted(d.channel for d in fakes.store.deliveries.values()) == ["email", "push", "sms"]
    assert wakes == [1]
    assert fakes.metrics.created == [Kind.VOUCHER_ISSUED]


async def test_opted_out_channels_get_no_delivery(fakes) -> None:
    await UserNotifications(fakes.uow).update_preferences(
        7, email=False, sms=None, push=False, language="en"
    )
    use_case, _ = notify(fakes)
    await use_case.accept([voucher_event()])
    [notification] = fakes.store.notifications.values()
    assert notification.channels == (Channel.SMS,)
    assert notification.title == "Your voucher CAKE-SAMPLE01 is ready"  # English, as chosen


async def test_each_message_goes_out_once_in_the_users_language(fakes) -> None:
    use_case, _ = notify(fakes)
    await use_case.accept([voucher_event()])
    sending = dispatcher(fakes)
    assert await sending.run_once() == 3
    assert await sending.run_once() == 0
    [email] = fakes.email.sent
    assert email.recipient == "an@example.com"
    assert email.subject.startswith("Mã giảm giá Cake")  # Vietnamese by default
    assert "Xin chào An," in email.body
    assert [m.recipient for m in fakes.sms.sent] == ["0900000007"]
    assert len(fakes.push.sent) == 1
    assert {d.status for d in fakes.store.deliveries.values()} == {"sent"}


async def test_a_server_down_is_retried_with_backoff_until_it_is_sent_once(fakes) -> None:
    now = [T0]
    use_case, _ = notify(fakes)
    await use_case.accept([voucher_event()])
    fakes.email.fail_next = [TransientSendError("connection refused")] * 3
    sending = dispatcher(fakes, clock=lambda: now[0])
    await sending.run_once()
    assert fakes.email.sent == []
    [email_delivery] = [d for d in fakes.store.deliveries.values() if d.channel == Channel.EMAIL]
    waits = []
    for _ in range(3):
        assert email_delivery.due_at is not None
        waits.append(email_delivery.due_at - now[0])
        assert await sending.run_once() == 0  # not due yet
        now[0] = email_delivery.due_at
        await sending.run_once()
    assert [m.channel for m in fakes.email.sent] == [Channel.EMAIL]
    assert email_delivery.status == "sent"
    # Equal-jitter exponential backoff: at least half of 1 s, 2 s, 4 s.
    assert [w >= timedelta(seconds=s) for w, s in zip(waits, (0.5, 1, 2), strict=True)] == [
        True
    ] * 3
    assert fakes.metrics.retried == [Channel.EMAIL] * 3


async def test_a_refused_address_fails_for_good_and_no_contact_is_skipped(fakes) -> None:
    use_case, _ = notify(fakes)
    await use_case.accept([voucher_event(), voucher_event(user_id=8)])  # 8: unknown to auth
    fakes.email.fail_next = [PermanentSendError("550 no such user")]
    await dispatcher(fakes).run_once()
    statuses = sorted(
        (d.notification.user_id, d.channel.value, d.status) for d in fakes.store.deliveries.values()
    )
    assert statuses == [
        (7, "email", "failed"),
        (7, "push", "sent"),
        (7, "sms", "sent"),
        (8, "email", "skipped"),
        (8, "push", "skipped"),
        (8, "sms", "skipped"),
    ]
    assert fakes.metrics.failed == [Channel.EMAIL]
    assert sorted(fakes.metrics.skipped) == [
        (Channel.EMAIL, "unknown_user"),
        (Channel.PUSH, "unknown_user"),
        (Channel.SMS, "unknown_user"),
    ]


async def test_a_user_without_a_phone_is_skipped_on_sms_and_push_not_failed_nor_retried(
    fakes,
) -> None:
    fakes.directory.contacts_by_user[7] = Contacts(7, "ann@example.com", "", "Ann")
    use_case, _ = notify(fakes)
    await use_case.accept([voucher_event()])
    sending = dispatcher(fakes)
    await sending.run_once()
    statuses = sorted((d.channel.value, d.status) for d in fakes.store.deliveries.values())
    assert statuses == [("email", "sent"), ("push", "skipped"), ("sms", "skipped")]
    assert sorted(fakes.metrics.skipped) == [
        (Channel.PUSH, "no_contact"),
        (Channel.SMS, "no_contact"),
    ]
    assert fakes.metrics.failed == [] and fakes.metrics.retried == []
    assert await sending.run_once() == 0  # nothing left pending: never retried


async def test_an_event_older_than_the_maximum_age_is_recorded_but_nobody_is_notified(
    fakes,
) -> None:
    use_case, wakes = notify(fakes)
    old = voucher_event(at=T0 - timedelta(days=90))
    just_in_time = voucher_event(user_id=8, at=T0 - timedelta(hours=23))
    outcomes = await use_case.accept([old, just_in_time])
    assert outcomes == ["too_old", "notified"]
    assert [n.user_id for n in fakes.store.notifications.values()] == [8]
    assert {d.notification.user_id for d in fakes.store.deliveries.values()} == {8}
    assert fakes.metrics.too_old == [Kind.VOUCHER_ISSUED]
    assert old.facts.event_id in fakes.store.inbox  # recorded: a replay is a duplicate
    assert await use_case.accept([old]) == ["duplicate"]
    assert wakes == [1]


async def test_an_idle_dispatcher_sleeps_until_the_next_retry_is_due_within_the_poll(
    fakes,
) -> None:
    now = [T0]
    sending = Dispatcher(
        fakes.uow,
        fakes.directory,
        JinjaRenderer(),
        {Channel.EMAIL: fakes.email, Channel.SMS: fakes.sms, Channel.PUSH: fakes.push},
        fakes.metrics,
        retry=RetryPolicy(base_seconds=1, max_seconds=8),
        idle_poll_seconds=30,
        clock=lambda: now[0],
    )
    assert await sending._idle_seconds() == 30  # nothing pending: the fallback poll
    use_case, _ = notify(fakes)
    await use_case.accept([voucher_event()])
    fakes.email.fail_next = [TransientSendError("421 try later")]
    await sending.run_once()
    (email,) = [d for d in fakes.store.deliveries.values() if d.channel is Channel.EMAIL]
    assert email.status == "pending"
    assert await sending._idle_seconds() == (email.due_at - now[0]).total_seconds()
    now[0] = email.due_at + timedelta(seconds=1)  # overdue but not claimed (locked elsewhere)
    assert await sending._idle_seconds() == 0.05


async def test_auth_down_delays_messages_without_losing_them(fakes) -> None:
    now = [T0]
    use_case, _ = notify(fakes)
    await use_case.accept([voucher_event()])
    fakes.directory.down = True
    sending = dispatcher(fakes, clock=lambda: now[0])
    await sending.run_once()
    assert {d.status for d in fakes.store.deliveries.values()} == {"pending"}
    fakes.directory.down = False
    now[0] = T0 + timedelta(seconds=5)
    await sending.run_once()
    assert {d.status for d in fakes.store.deliveries.values()} == {"sent"}


async def test_list_pages_newest_first_with_unread_count_and_mark_read(fakes) -> None:
    use_case, _ = notify(fakes)
    await use_case.accept([voucher_event(at=T0 + timedelta(minutes=i)) for i in range(5)])
    inbox = UserNotifications(fakes.uow, clock=lambda: T0 + timedelta(hours=1))
    first = await inbox.list(7, requested_size=2, page_token="", unread_only=False)
    assert [n.created_at.minute for n in first.notifications] == [4, 3]
    assert first.unread_count == 5
    second = await inbox.list(
        7, requested_size=2, page_token=first.next_page_token, unread_only=False
    )
    third = await inbox.list(
        7, requested_size=2, page_token=second.next_page_token, unread_only=False
    )
    assert [n.created_at.minute for n in second.notifications + third.notifications] == [2, 1, 0]
    assert third.next_page_token == ""
    read = await inbox.mark_read(7, first.notifications[0].id)
    assert read.read and read.read_at == T0 + timedelta(hours=1)
    assert (
        await inbox.list(7, requested_size=0, page_token="", unread_only=True)
    ).unread_count == 4
    with pytest.raises(NotFound):
        await inbox.mark_read(8, first.notifications[1].id)  # someone else's
    with pytest.raises(InvalidArgument):
        await inbox.list(7, requested_size=2, page_token="garbage", unread_only=False)


async def test_preferences_default_and_update(fakes) -> None:
    inbox = UserNotifications(fakes.uow)
    assert (await inbox.preferences(7)).language_or(None) is Language.VI
    updated = await inbox.update_preferences(7, email=False, sms=None, push=None, language=None)
    assert (updated.email, updated.sms, updated.push) == (False, True, True)
    assert await inbox.preferences(7) == updated


class SlowSender:
    """Takes a random moment per message, so the loops interleave for real."""

    def __init__(self) -> None:
        self.sent: list[OutgoingMessage] = []
        self.progress = asyncio.Event()

    async def send(self, message: OutgoingMessage) -> None:
        await asyncio.sleep(random.uniform(0, 0.003))
        self.sent.append(message)
        self.progress.set()

    async def until(self, count: int) -> None:
        while len(self.sent) < count:
            self.progress.clear()
            await self.progress.wait()


async def test_wake_ups_alone_drive_the_loops_and_no_commit_is_missed(fakes) -> None:
    """The fallback poll is an hour: only the consumer's wake-ups (and a full claim waking
    another loop) can get these sent."""
    for user_id in range(100, 160):
        fakes.directory.contacts_by_user[user_id] = Contacts(
            user_id, f"u{user_id}@example.com", "0900000000"
        )
    sender = SlowSender()
    wakes = 0
    sending = Dispatcher(
        fakes.uow,
        fakes.directory,
        JinjaRenderer(),
        {Channel.EMAIL: sender, Channel.SMS: sender, Channel.PUSH: sender},
        fakes.metrics,
        retry=RetryPolicy(base_seconds=1, max_seconds=8),
        batch_size=2,  # three deliveries per event: a full claim, then the rest
        workers=1,  # no other loop asleep to take a wake-up the busy one would miss
        concurrency=8,
        idle_poll_seconds=3600,
        clock=lambda: T0 + timedelta(seconds=1),
    )

    def wake(users: Sequence[int]) -> None:
        nonlocal wakes
        wakes += 1
        sending.wake(users)

    use_case = NotifyUsers(
        fakes.uow, JinjaRenderer(), fakes.metrics, wake, clock=lambda: T0 + timedelta(seconds=1)
    )
    sending.start()
    try:
        for count, user_id in enumerate(range(100, 160), start=1):
            # Each commit right as the loops finish the last one and head for sleep: a wake
            # lost in that moment leaves this event unsent for the hour.
            await use_case.accept([voucher_event(user_id=user_id)])
            async with asyncio.timeout(2):
                await sender.until(3 * count)
    finally:
        await sending.stop()
    assert wakes == 60
    assert sorted(m.delivery_id for m in sender.sent) == sorted(fakes.store.deliveries)
    assert {d.status for d in fakes.store.deliveries.values()} == {"sent"}


async def test_a_commit_looks_its_users_contacts_up_before_any_claim(fakes) -> None:
    asked: list[int] = []
    both = asyncio.Event()

    class Directory:
        async def contacts(self, user_id: int) -> Contacts | None:
            asked.append(user_id)
            if len(asked) == 2:
                both.set()
            await asyncio.sleep(0)
            return fakes.directory.contacts_by_user.get(user_id)

    sending = Dispatcher(
        fakes.uow,
        Directory(),
        JinjaRenderer(),
        {Channel.EMAIL: fakes.email, Channel.SMS: fakes.sms, Channel.PUSH: fakes.push},
        fakes.metrics,
        retry=RetryPolicy(base_seconds=1, max_seconds=8),
        clock=lambda: T0 + timedelta(seconds=1),
    )
    use_case = NotifyUsers(
        fakes.uow,
        JinjaRenderer(),
        fakes.metrics,
        sending.wake,
        clock=lambda: T0 + timedelta(seconds=1),
    )
    await use_case.accept([voucher_event(), voucher_event(user_id=8)])
    async with asyncio.timeout(2):  # no loop was started: nothing claims, the lookups run
        await both.wait()
    await sending.stop()
    assert sorted(asked) == [7, 8]
    assert {d.status for d in fakes.store.deliveries.values()} == {"pending"}


def handing_dispatcher(fakes, sender, **options) -> Dispatcher:  # type: ignore[no-untyped-def]
    return Dispatcher(
        fakes.uow,
        fakes.directory,
        JinjaRenderer(),
        {Channel.EMAIL: sender, Channel.SMS: sender, Channel.PUSH: sender},
        fakes.metrics,
        retry=RetryPolicy(base_seconds=0.01, max_seconds=0.05),
        idle_poll_seconds=3600,
        clock=lambda: T0 + timedelta(seconds=1),
        **options,
    )


async def test_a_commit_hands_its_deliveries_over_claimed_and_they_go_out_without_a_claim(
    fakes,
) -> None:
    sender = SlowSender()
    sending = handing_dispatcher(fakes, sender, workers=1)
    wakes: list[Sequence[int]] = []
    use_case = NotifyUsers(
        fakes.uow,
        JinjaRenderer(),
        fakes.metrics,
        wakes.append,
        hand_off=sending,
        clock=lambda: T0 + timedelta(seconds=1),
    )
    sending.start()
    try:
        await use_case.accept([voucher_event()])
        # Stored claimed (one attempt, leased): no loop can claim them meanwhile.
        assert {(d.status, d.attempts) for d in fakes.store.deliveries.values()} == {("pending", 1)}
        assert await sending.run_once() == 0
        async with asyncio.timeout(2):
            await sender.until(3)
            await asyncio.gather(*sending._handed)  # each recorded once sent
        assert {d.status for d in fakes.store.deliveries.values()} == {"sent"}
    finally:
        await sending.stop()
    assert wakes == []  # no loop was needed
    assert sorted(m.delivery_id for m in sender.sent) == sorted(fakes.store.deliveries)
    assert sorted(fakes.metrics.sent) == sorted([Channel.EMAIL, Channel.SMS, Channel.PUSH])


async def test_a_users_deliveries_share_one_contacts_lookup(fakes) -> None:
    asked: list[int] = []

    class Directory:
        async def contacts(self, user_id: int) -> Contacts | None:
            asked.append(user_id)
            await asyncio.sleep(0.01)
            return fakes.directory.contacts_by_user.get(user_id)

    use_case, _ = notify(fakes)
    await use_case.accept([voucher_event()])
    sending = dispatcher(fakes)
    sending._directory = Directory()  # type: ignore[assignment]
    assert await sending.run_once() == 3
    assert asked == [7]  # three deliveries, one call to auth
    assert {d.status for d in fakes.store.deliveries.values()} == {"sent"}


async def all_sent(fakes) -> None:  # type: ignore[no-untyped-def]
    while True:
        if all(d.status == "sent" for d in fakes.store.deliveries.values()):
            return
        await asyncio.sleep(0.01)


class FlakySender(SlowSender):
    """Refuses about a third of the messages (the server briefly down)."""

    async def send(self, message: OutgoingMessage) -> None:
        await asyncio.sleep(random.uniform(0, 0.003))
        if random.random() < 0.3:
            raise TransientSendError("421 try later")
        await super().send(message)


async def test_concurrent_commits_handed_over_or_left_pending_each_message_goes_out_once(
    fakes,
) -> None:
    """Eight consumers' worth of commits at once, more deliveries than the dispatcher takes
    in hand (the rest wait for the loops), a sender refusing a third of the attempts (the
    retries go through the loops): every delivery is sent exactly once."""
    users = range(100, 260)
    for user_id in users:
        fakes.directory.contacts_by_user[user_id] = Contacts(
            user_id, f"u{user_id}@example.com", "0900000000"
        )
    sender = FlakySender()
    now = [T0]
    sending = Dispatcher(
        fakes.uow,
        fakes.directory,
        JinjaRenderer(),
        {Channel.EMAIL: sender, Channel.SMS: sender, Channel.PUSH: sender},
        fakes.metrics,
        retry=RetryPolicy(base_seconds=0.01, max_seconds=0.05),
        batch_size=5,
        workers=4,
        concurrency=8,
        max_in_hand=30,
        idle_poll_seconds=0.05,
        clock=lambda: now[0],
    )
    use_case = NotifyUsers(
        fakes.uow,
        JinjaRenderer(),
        fakes.metrics,
        sending.wake,
        hand_off=sending,
        clock=lambda: now[0],
    )

    async def tick() -> None:  # the retries' backoff passes
        while True:
            await asyncio.sleep(0.005)
            now[0] += timedelta(seconds=0.05)

    async def consumer(mine: list[int]) -> None:
        for start in range(0, len(mine), 4):
            await use_case.accept([voucher_event(user_id=u) for u in mine[start : start + 4]])
            await asyncio.sleep(0)

    clock = asyncio.create_task(tick())
    sending.start()
    try:
        await asyncio.gather(*(consumer(list(users)[n::8]) for n in range(8)))
        async with asyncio.timeout(20):
            await all_sent(fakes)
    finally:
        await sending.stop()
        clock.cancel()
    assert len(fakes.store.deliveries) == 3 * len(users)
    sent = [m.delivery_id for m in sender.sent]
    assert sorted(sent) == sorted(fakes.store.deliveries)  # each once, none twice
    assert fakes.metrics.retried  # the refusals really happened
    assert max(d.attempts for d in fakes.store.deliveries.values()) > 1


async def test_a_handed_delivery_whose_lease_is_half_gone_is_left_for_a_later_claim(
    fakes,
) -> None:
    now = [T0]
    sending = handing_dispatcher(fakes, fakes.email, workers=1, lease_seconds=60)
    sending._clock = lambda: now[0]  # type: ignore[method-assign]
    use_case = NotifyUsers(
        fakes.uow, JinjaRenderer(), fakes.metrics, hand_off=sending, clock=lambda: now[0]
    )
    sending.start()
    try:
        await use_case.accept([voucher_event()])
        now[0] += timedelta(seconds=31)  # its turn comes late: less than half the lease left
        async with asyncio.timeout(2):
            await asyncio.gather(*sending._handed)
        assert fakes.email.sent == []
        assert {d.status for d in fakes.store.deliveries.values()} == {"pending"}
        now[0] += timedelta(seconds=30)  # the lease ran out: a claim sends it, once
        assert await sending.run_once() == 3
    finally:
        await sending.stop()
    assert len(fakes.email.sent) == 3
    assert {d.status for d in fakes.store.deliveries.values()} == {"sent"}


async def test_a_commit_handing_deliveries_over_looks_contacts_up_while_it_commits(
    fakes,
) -> None:
    asked = asyncio.Event()

    class Directory:
        async def contacts(self, user_id: int) -> Contacts | None:
            asked.set()
            return fakes.directory.contacts_by_user.get(user_id)

    def commits_once_asked():  # type: ignore[no-untyped-def]
        uow = fakes.uow()

        async def commit() -> None:  # a commit that takes until auth has been asked
            async with asyncio.timeout(2):
                await asked.wait()

        uow.commit = commit
        return uow

    sending = handing_dispatcher(fakes, fakes.email, workers=1)
    sending._directory = Directory()  # type: ignore[assignment]
    use_case = NotifyUsers(
        commits_once_asked,
        JinjaRenderer(),
        fakes.metrics,
        hand_off=sending,
        clock=lambda: T0 + timedelta(seconds=1),
    )
    sending.start()
    try:
        await use_case.accept([voucher_event()])  # times out if the lookup waits for it
        async with asyncio.timeout(2):
            await asyncio.gather(*sending._handed)
    finally:
        await sending.stop()
    assert len(fakes.email.sent) == 3  # e-mail, SMS, push
