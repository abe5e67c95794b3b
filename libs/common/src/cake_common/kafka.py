"""Kafka clients configured for Cake's delivery guarantees, plus topic set-up.

Producers are idempotent with ``acks=all`` (no loss, no duplicates from producer retries);
consumers commit manually, after the database transaction that applied the message, and
read only committed transactional data. Factories must be called inside a running event
loop (aiokafka binds to it).

Trace context rides in the W3C ``traceparent``/``tracestate`` headers:
:func:`with_current_trace` puts the current span's there (the relay, inside its span per
row), :func:`start_span_from_headers` continues it on the consumer side.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar
from uuid import UUID

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code
from cake.events.v1 import registry
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind
from opentelemetry.util.types import Attributes

from cake_common.logging import get_logger
from cake_common.startup_retry import startup_retrying
from cake_common.tracing import (
    TRACE_CONTEXT_KEYS,
    TRACEPARENT,
    context_from_trace_headers,
    current_trace_headers,
    start_span_in_context,
)

TRACE_PARENT_HEADER = TRACEPARENT

KafkaHeaders = Sequence[tuple[str, bytes | None]]
"""Message headers as aiokafka gives them: (key, value) pairs, keys may repeat."""

_RETRYABLE_AT_START: tuple[type[BaseException], ...] = (KafkaError, OSError, TimeoutError)

_log = get_logger(__name__)


class _KafkaClient(Protocol):
    async def start(self) -> None: ...


_Client = TypeVar("_Client", bound=_KafkaClient)


def create_producer(bootstrap_servers: str, client_id: str, **overrides: Any) -> AIOKafkaProducer:
    """An (unstarted) idempotent producer: ``acks="all"``, ``enable_idempotence=True``.

    A short ``linger_ms`` batches the bursts the relay sends without adding noticeable latency.
    """
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers,
        "client_id": client_id,
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
    }
    config.update(overrides)
    return AIOKafkaProducer(**config)


def create_consumer(
    bootstrap_servers: str,
    topics: Sequence[str],
    group_id: str,
    client_id: str,
    **overrides: Any,
) -> AIOKafkaConsumer:
    """An (unstarted) consumer with manual commits, earliest reset and read_committed."""
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers,
        "group_id": group_id,
        "client_id": client_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
    }
    config.update(overrides)
    return AIOKafkaConsumer(*topics, **config)


async def start_with_retry(factory: Callable[[], _Client], *, timeout_seconds: float) -> _Client:
    """Create and start a client, retrying with backoff while the brokers are unreachable.

    A client whose ``start()`` failed is stopped and discarded, and a fresh one made for
    the next attempt: aiokafka clients are not meant to be restarted after a failed start.
    """
    async for attempt in startup_retrying(
        "kafka", timeout_seconds=timeout_seconds, retry_on=_RETRYABLE_AT_START
    ):
        with attempt:
            client = factory()
            try:
                await client.start()
            except BaseException:
                await _stop_quietly(client)
                raise
    return client


async def _stop_quietly(client: object) -> None:
    stop = getattr(client, "stop", None) or getattr(client, "close", None)
    if stop is None:
        return
    try:
        await stop()
    except Exception as error:
        _log.debug("closing a half-started kafka client failed", error=repr(error))


async def ensure_topics(
    bootstrap_servers: str,
    topics: Mapping[str, int],
    replication: int = 1,
    *,
    timeout_seconds: float = 60.0,
    client_id: str = "cake-topic-admin",
) -> None:
    """Create the missing topics (name → partitions); existing topics are left as they are.

    Safe to run from every replica at start-up: a topic created concurrently by another
    replica counts as success.
    """
    admin: AIOKafkaAdminClient = await start_with_retry(
        lambda: AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id=client_id),
        timeout_seconds=timeout_seconds,
    )
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name=name, num_partitions=partitions, replication_factor=replication)
            for name, partitions in topics.items()
            if name not in existing
        ]
        if not missing:
            return
        response = await admin.create_topics(missing)
        for topic, error_code, *_ in response.topic_errors:
            if error_code not in (0, TopicAlreadyExistsError.errno):
                raise for_code(error_code)(f"could not create topic {topic}")
        _log.info("kafka topics created", topics=[topic.name for topic in missing])
    finally:
        await admin.close()


def kafka_headers(
    event_id: UUID | str, event_type: str, trace_parent: str | None = None
) -> list[tuple[str, bytes]]:
    """CloudEvents-style headers named by the event registry: the event id (consumers
    dedupe on it), the event type and, when known, W3C ``traceparent``."""
    headers = [
        (registry.EVENT_ID_HEADER, str(event_id).encode()),
        (registry.EVENT_TYPE_HEADER, event_type.encode()),
    ]
    if trace_parent:
        headers.append((TRACE_PARENT_HEADER, trace_parent.encode()))
    return headers


def header_value(headers: KafkaHeaders | None, key: str) -> str | None:
    """The value of header ``key`` decoded as UTF-8, ``None`` if absent; when a key repeats
    the last one wins (a later producer stage overrides an earlier one)."""
    found: bytes | None = None
    for item_key, value in headers or ():
        if item_key == key and value is not None:
            found = value
    return found.decode("utf-8", errors="replace") if found is not None else None


def with_current_trace(headers: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """A copy of ``headers`` carrying the CURRENT span's trace context (replacing any
    ``traceparent``/``tracestate`` already there); unchanged when there is no current span.

    The relay calls it inside its span for an outbox row, so the consumer continues from
    the publication, not straight from the request that wrote the row.
    """
    trace_headers = current_trace_headers()
    if not trace_headers:
        return list(headers)
    kept = [(key, value) for key, value in headers if key not in TRACE_CONTEXT_KEYS]
    return kept + [(key, value.encode()) for key, value in trace_headers.items()]


def trace_context_from_headers(headers: KafkaHeaders | None) -> Context:
    """The trace context a message carries (empty when it has none, e.g. old messages)."""
    carrier = {}
    for key in TRACE_CONTEXT_KEYS:
        value = header_value(headers, key)
        if value is not None:
            carrier[key] = value
    return context_from_trace_headers(carrier)


def start_span_from_headers(
    name: str,
    headers: KafkaHeaders | None,
    *,
    kind: SpanKind = SpanKind.CONSUMER,
    attributes: Attributes = None,
) -> AbstractContextManager[Span]:
    """A span continuing the trace of a consumed message, current for the ``with`` block:
    wrap the handling of one message in it (outbox rows written inside carry it on)."""
    return start_span_in_context(
        name, trace_context_from_headers(headers), kind=kind, attributes=attributes
    )
