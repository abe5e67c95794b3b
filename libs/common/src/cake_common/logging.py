"""Structured logging: structlog and stdlib ``logging`` both rendered as JSON lines on stdout.

Every record carries ``timestamp`` (ISO 8601, UTC), ``level``, ``logger``, ``event``,
``service``, inside a gRPC call ``request_id``, and inside a span (a traced request, an event
being relayed or consumed) the span's ``trace_id`` and ``span_id`` in the hex form trace
backends search for, so a log line leads to its trace and back. Secrets are scrubbed by
:func:`redact_secrets` before rendering, wherever they appear in the record.

Nothing is configured on import: the service's entry point calls :func:`configure_logging`.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

import structlog
from opentelemetry import trace
from structlog.typing import EventDict, Processor, WrappedLogger

request_id_var: ContextVar[str | None] = ContextVar("cake_request_id", default=None)
"""Id of the request being served; set by the gRPC request-id interceptor."""

REDACTED = "[REDACTED]"

# Matched as substrings of lower-cased keys, so `access_token`, `db_password`,
# `client_secret` and `Authorization` are all caught.
_SENSITIVE_KEY_PARTS = (
    "password",
    "passwd",
    "secret",
    "token",
    "authorization",
    "cookie",
    "api_key",
    "apikey",
    "private_key",
    "credential",
)
# Secrets that hide inside free text (messages, exception strings, URLs).
_URL_PASSWORD = re.compile(r"(?P<prefix>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s]+@")
_BEARER = re.compile(r"(?i)\bbearer\s+[A-Za-z0-9\-._~+/]+=*")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

# Keys that structlog itself owns; never redacted.
_RESERVED_KEYS = frozenset({"event", "level", "logger", "timestamp"})


def _is_sensitive_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    lowered = key.lower()
    return any(part in lowered for part in _SENSITIVE_KEY_PARTS)


def _scrub_text(text: str) -> str:
    # Cheap pre-checks keep the common case (no URL, no token) free of regex work.
    if "://" in text:
        text = _URL_PASSWORD.sub(r"\g<prefix>***@", text)
    if "earer" in text or "EARER" in text:
        text = _BEARER.sub(f"Bearer {REDACTED}", text)
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    return text


def _scrub_value(value: object) -> object:
    if isinstance(value, str):
        return _scrub_text(value)
    if isinstance(value, Mapping):
        return {
            key: REDACTED if _is_sensitive_key(key) else _scrub_value(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_scrub_value(item) for item in value)
    return value


def redact_secrets(_logger: WrappedLogger, _method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask values under sensitive keys and secrets inside text."""
    for key, value in event_dict.items():
        if key not in _RESERVED_KEYS and _is_sensitive_key(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _scrub_value(value)
    return event_dict


def add_request_id(_logger: WrappedLogger, _method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: bind the current call's request id, if any."""
    request_id = request_id_var.get()
    if request_id is not None:
        event_dict.setdefault("request_id", request_id)
    return event_dict


def add_trace_context(
    _logger: WrappedLogger, _method_name: str, event_dict: EventDict
) -> EventDict:
    """structlog processor: the current span's ``trace_id`` and ``span_id`` (32 and 16 hex
    digits, as in a W3C ``traceparent``), when there is a span. A trace continued from an
    upstream ``traceparent`` while tracing is off still has its ids here."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict.setdefault("trace_id", trace.format_trace_id(context.trace_id))
        event_dict.setdefault("span_id", trace.format_span_id(context.span_id))
        event_dict.setdefault("trace_sampled", context.trace_flags.sampled)
    return event_dict


class _ServiceNameAdder:
    def __init__(self, service_name: str | None) -> None:
        self._service_name = service_name

    def __call__(
        self, _logger: WrappedLogger, _method_name: str, event_dict: EventDict
    ) -> EventDict:
        if self._service_name is not None:
            event_dict.setdefault("service", self._service_name)
        return event_dict


_process_fields: dict[str, Any] = {}


def set_process_fields(**fields: Any) -> None:
    """Fields every log line of this process carries from now on, e.g. ``worker=1`` in a
    worker process of a service that runs several (:mod:`cake_common.workers`)."""
    _process_fields.update(fields)


def _add_process_fields(
    _logger: WrappedLogger, _method_name: str, event_dict: EventDict
) -> EventDict:
    for key, field_value in _process_fields.items():
        event_dict.setdefault(key, field_value)
    return event_dict


class _CakeLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installs so reconfiguring replaces it."""


def configure_logging(level: str, json: bool, *, service_name: str | None = None) -> None:
    """Route structlog and stdlib logging to stdout, JSON lines if ``json`` else console text.

    Safe to call more than once (tests, CLI sub-commands): the previous handler is replaced.
    """
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        add_request_id,
        add_trace_context,
        _ServiceNameAdder(service_name),
        _add_process_fields,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Processor
    if json:
        # Exceptions become a string field first so redaction also sees their text.
        shared += [structlog.processors.format_exc_info, redact_secrets]
        renderer = structlog.processors.JSONRenderer()
    else:
        shared.append(redact_secrets)
        renderer = structlog.dev.ConsoleRenderer()

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.PositionalArgumentsFormatter(),
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )

    handler = _CakeLogHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for existing in [h for h in root.handlers if isinstance(h, _CakeLogHandler)]:
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(numeric_level)


def get_logger(name: str, **initial_values: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger named ``name``; lazy, so it is safe to create at module level."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name, **initial_values)
    return logger
