"""Configuration: the consumer's fields come from ``cake_common.settings.ConsumerSettings``
under this service's prefix, with the bound this service keeps on a poll batch."""

from __future__ import annotations

import pytest
from cake_notifications.settings import NotificationsSettings
from pydantic import ValidationError

URL = "postgresql+psycopg://cake_notifications:secret@127.0.0.1:5432/cake_notifications"


def test_consumer_variables_keep_the_service_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAKE_NOTIFICATIONS_CONSUMER_ENABLED", "false")
    monkeypatch.setenv("CAKE_NOTIFICATIONS_CONSUMER_MAX_BATCH", "10000")
    monkeypatch.setenv("CAKE_NOTIFICATIONS_CONSUMER_RETRY_MAX_SECONDS", "3")
    settings = NotificationsSettings(database_url=URL)  # type: ignore[arg-type]
    assert settings.consumer_enabled is False
    assert settings.consumer_max_batch == 10_000
    assert settings.consumer_retry_max_seconds == 3.0
    assert settings.consumer_group == "notifications"


def test_a_poll_batch_is_at_most_ten_thousand_events() -> None:
    with pytest.raises(ValidationError, match="at most 10000"):
        NotificationsSettings(database_url=URL, consumer_max_batch=10_001)  # type: ignore[arg-type]
