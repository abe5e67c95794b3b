from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog
from cake_common.logging import (
    REDACTED,
    configure_logging,
    get_logger,
    redact_secrets,
    request_id_var,
)


class JsonLines:
    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys
        # The handler binds sys.stdout when configured, which must be capsys's: so
        # configure here, in the test's call phase, not during fixture setup.
        configure_logging("INFO", json=True, service_name="example")

    def __call__(self) -> list[dict[str, Any]]:
        """Records of this test's loggers only: background tasks left by earlier tests
        (e.g. Kafka clients closing) may log meanwhile through the same root handler."""
        lines = self._capsys.readouterr().out.splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        return [
            r for r in records if r.get("logger", "").startswith(("cake.test.", "some.library"))
        ]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


@pytest.fixture
def json_lines(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> Callable[[], JsonLines]:
    return lambda: JsonLines(capsys)


def test_structlog_record_shape(json_lines: Any) -> None:
    read = json_lines()
    token = request_id_var.set("req-123")
    try:
        get_logger("cake.test.shape").info("user logged in", user_id=7)
    finally:
        request_id_var.reset(token)
    (record,) = read()
    assert record["event"] == "user logged in"
    assert record["level"] == "info"
    assert record["logger"] == "cake.test.shape"
    assert record["service"] == "example"
    assert record["request_id"] == "req-123"
    assert record["user_id"] == 7
    assert record["timestamp"].endswith("Z")


def test_stdlib_logging_is_routed_through(json_lines: Any) -> None:
    read = json_lines()
    logging.getLogger("some.library").warning("disk %s is %d%% full", "/data", 93)
    (record,) = read()
    assert record["event"] == "disk /data is 93% full"
    assert record["level"] == "warning"
    assert record["logger"] == "some.library"
    assert record["service"] == "example"
    assert "request_id" not in record


def test_level_filters(json_lines: Any) -> None:
    read = json_lines()
    get_logger("cake.test.level").debug("noise")
    logging.getLogger("cake.test.level.std").debug("noise")
    assert read() == []


def test_secrets_redacted_in_output(json_lines: Any) -> None:
    read = json_lines()
    jwt_like = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiI0MiJ9.c2lnbmF0dXJl"
    get_logger("cake.test.redact").info(
        "connecting to postgresql+psycopg://cake:hunter2@db:5432/cake",
        password="hunter2",
        access_token=jwt_like,
        headers={"Authorization": f"Bearer {jwt_like}", "accept": "json"},
        note=f"got Bearer {jwt_like} from client",
        client_secret="s3",
    )
    (record,) = read()
    text = json.dumps(record)
    assert "hunter2" not in text
    assert jwt_like not in text
    assert record["password"] == REDACTED
    assert record["access_token"] == REDACTED
    assert record["client_secret"] == REDACTED
    assert record["headers"] == {"Authorization": REDACTED, "accept": "json"}
    assert record["event"] == "connecting to postgresql+psycopg://cake:***@db:5432/cake"
    assert "Bearer [REDACTED]" in record["note"]


def test_exception_text_is_scrubbed(json_lines: Any) -> None:
    read = json_lines()
    try:
        raise ConnectionError("could not connect to redis://:topsecret@cache:6379/0")
    except ConnectionError:
        get_logger("cake.test.exc").exception("redis down")
    (record,) = read()
    assert "ConnectionError" in record["exception"]
    assert "topsecret" not in record["exception"]


def test_redact_processor_directly() -> None:
    event = redact_secrets(
        None, "info", {"event": "x", "db_password": "p", "items": [{"token": "t"}]}
    )
    assert event == {"event": "x", "db_password": REDACTED, "items": [{"token": REDACTED}]}


def test_console_mode_configures(capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    configure_logging("WARNING", json=False)
    configure_logging("WARNING", json=False)  # idempotent: still one handler of ours
    ours = [h for h in logging.getLogger().handlers if type(h).__name__ == "_CakeLogHandler"]
    assert len(ours) == 1
    get_logger("cake.test.console").warning("plain text", password="pw")
    out = capsys.readouterr().out
    assert "plain text" in out
    assert "pw'" not in out and "=pw" not in out
