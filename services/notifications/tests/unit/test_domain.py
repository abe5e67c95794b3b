from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest
from cake_common.errors import InvalidArgument
from cake_notifications.domain.notifications import (
    Channel,
    Kind,
    Language,
    PageCursor,
    Preferences,
    channels_for,
    page_size,
    parse_language,
    too_old_to_notify,
)


def test_every_channel_by_default_and_opt_outs_are_honoured() -> None:
    everyone = Preferences(user_id=1)
    assert channels_for(Kind.VOUCHER_ISSUED, everyone) == (Channel.EMAIL, Channel.SMS, Channel.PUSH)
    no_email = everyone.changed(email=False)
    assert channels_for(Kind.VOUCHER_ISSUED, no_email) == (Channel.SMS, Channel.PUSH)
    assert channels_for(Kind.PAYMENT_PROCESSED, no_email.changed(sms=False, push=False)) == ()


def test_a_spent_voucher_is_no_second_email_for_one_topup() -> None:
    assert Channel.EMAIL not in channels_for(Kind.VOUCHER_USED, Preferences(user_id=1))
    assert Channel.EMAIL in channels_for(Kind.PAYMENT_PROCESSED, Preferences(user_id=1))


def test_changed_keeps_unset_fields_and_refuses_unknown_languages() -> None:
    chosen = Preferences(user_id=1, sms=False).changed(language="en")
    assert (chosen.email, chosen.sms, chosen.push, chosen.language) == (
        True,
        False,
        True,
        Language.EN,
    )
    for bad in ("fr", "EN", "en-US", ""):
        with pytest.raises(InvalidArgument) as refused:
            chosen.changed(language=bad)
        assert refused.value.violations[0].field == "language"


def test_language_fallbacks() -> None:
    assert Preferences(user_id=1).language_or(None) is Language.VI
    assert Preferences(user_id=1).language_or(Language.EN) is Language.EN
    assert Preferences(user_id=1, language=Language.VI).language_or(Language.EN) is Language.VI
    assert parse_language("en_US") is Language.EN
    assert parse_language("vi-VN") is Language.VI
    assert parse_language("de") is None
    assert parse_language(None) is None


def test_page_tokens_round_trip_and_foreign_ones_are_refused() -> None:
    cursor = PageCursor(datetime(2026, 12, 5, 4, 0, tzinfo=UTC), uuid4())
    assert PageCursor.parse(cursor.token()) == cursor
    for bad in ("nope", "e30", cursor.token()[:-3], "!!!", "eyJ0IjogMX0"):
        with pytest.raises(InvalidArgument) as refused:
            PageCursor.parse(bad)
        assert refused.value.reason == "INVALID_PAGE_TOKEN"


def test_page_size_defaults_and_caps() -> None:
    assert page_size(0) == 20
    assert page_size(5) == 5
    assert page_size(1000) == 100


def test_an_event_is_too_old_to_notify_only_beyond_the_maximum_age() -> None:
    now = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
    day = timedelta(hours=24)
    assert too_old_to_notify(now - timedelta(days=90), now, day)
    assert too_old_to_notify(now - day - timedelta(seconds=1), now, day)
    assert not too_old_to_notify(now - day, now, day)
    assert not too_old_to_notify(now - timedelta(seconds=1), now, day)
    assert not too_old_to_notify(now + timedelta(minutes=5), now, day)  # clock skew
