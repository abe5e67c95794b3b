"""The event registry (``cake.events.v1.registry``, generated from the contracts) and the rule
that no event type, topic, payload name or event header is spelled anywhere else.

The registry is checked against the descriptors it was generated from, the envelope's own
validation rule and the wire names existing data and consumers rely on; the source of the
services, the shared libraries, the dev tools and the benchmarks is scanned (with ``ast``, so
comments and docstrings may still name an event) for string literals of registry facts.
"""

from __future__ import annotations

import ast
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import protovalidate
import pytest
from buf.validate import validate_pb2
from cake.events.v1 import envelope_pb2, options_pb2, payloads_pb2, registry
from google.protobuf.timestamp_pb2 import Timestamp

ROOT = Path(__file__).resolve().parents[2]
SCANNED = (
    *sorted((ROOT / "services").glob("*/src")),
    ROOT / "libs" / "common" / "src",
    ROOT / "tools" / "devtools" / "src",
    ROOT / "bench",
)
"""Everything that produces, consumes, routes or creates topics, except the generated
package (``libs/protos/src``, where the registry itself lives) and tests (which pin the wire
names with literals on purpose)."""

_TOPIC_LIKE = re.compile(r"\bcake\.[a-z0-9_]+\.[a-z0-9_]+\.v[0-9]+\b")
"""A Cake topic name, registered or not (``cake.<service>.<entity>.v<N>``)."""


# --- the registry is what the contracts declare ---------------------------------------------


def test_every_event_type_value_has_a_registered_event() -> None:
    values = [v for v in envelope_pb2.EventType.DESCRIPTOR.values if v.number != 0]
    assert [registry.BY_TYPE[v.number].name for v in values] == [
        v.name.removeprefix("EVENT_TYPE_") for v in values
    ]
    assert len(registry.EVENTS) == len(values)
    for value in values:
        spec = registry.BY_TYPE[value.number]
        declared = value.GetOptions().Extensions[options_pb2.event]
        assert spec.payload.DESCRIPTOR.full_name == declared.payload == spec.payload_type
        assert spec.aggregate_type == declared.aggregate_type != ""
        if isinstance(spec, registry.PublishedEvent):
            assert spec.topic == declared.topic != ""
            assert not declared.audit_log
        else:
            assert isinstance(spec, registry.AuditLogEvent)
            assert declared.audit_log and declared.topic == ""
        assert registry.BY_NAME[spec.name] is spec


def test_the_registry_keeps_the_wire_names_existing_data_and_consumers_rely_on() -> None:
    assert {e.name: e.topic for e in registry.PUBLISHED} == {
        "USER_FIRST_LOGIN": "cake.auth.user.v1",
        "PROMOTION_ENROLLMENT": "cake.promotions.voucher.v1",
        "VOUCHER_ISSUED": "cake.promotions.voucher.v1",
        "VOUCHER_USED": "cake.promotions.voucher.v1",
        "PAYMENT_PROCESSED": "cake.promotions.payment.v1",
    }
    assert [e.name for e in registry.AUDIT_LOG] == ["SECURITY_AUDIT"]
    assert {e.aggregate_type for e in registry.EVENTS} == {"user"}
    assert (registry.EVENT_ID_HEADER, registry.EVENT_TYPE_HEADER) == ("ce_id", "ce_type")


def test_dead_letters_have_one_topic_rule_and_one_header_set() -> None:
    assert registry.DEAD_LETTER_TOPICS == (
        "cake.auth.user.v1.dlq",
        "cake.promotions.voucher.v1.dlq",
        "cake.promotions.payment.v1.dlq",
    )
    for event in registry.PUBLISHED:
        assert event.dead_letter_topic == registry.dead_letter_topic_for(event.topic)
        assert event.dead_letter_topic in registry.DEAD_LETTER_TOPICS
    assert not set(registry.TOPICS) & set(registry.DEAD_LETTER_TOPICS)
    assert registry.DEAD_LETTER_REASON_HEADER == "cake_dead_letter_reason"
    assert registry.DEAD_LETTER_ORIGIN_HEADER == "cake_dead_letter_origin"
    # What the promotions consumer wrote before the header set was one: still named, so
    # readers of older dead letters can accept them.
    assert registry.LEGACY_DEAD_LETTER_REASON_HEADERS == ("cake_dlq_reason",)
    assert registry.LEGACY_DEAD_LETTER_ORIGIN_HEADERS == ("cake_dlq_origin",)


def test_the_envelope_accepts_exactly_the_published_event_types() -> None:
    type_field = envelope_pb2.EventEnvelope.DESCRIPTOR.fields_by_name["type"]
    allowed = type_field.GetOptions().Extensions[validate_pb2.field].string.__getattribute__("in")
    assert sorted(allowed) == sorted(e.name for e in registry.PUBLISHED)


def _sample(event: registry.EventSpec[payloads_pb2.UserFirstLogin]) -> object:
    """A payload of ``event`` that keeps its contract's rules."""
    now = Timestamp()
    now.FromDatetime(datetime(2026, 12, 5, 1, 2, 3, tzinfo=UTC))
    samples = {
        registry.USER_FIRST_LOGIN.name: payloads_pb2.UserFirstLogin(user_id=7, login_at=now),
        registry.PROMOTION_ENROLLMENT.name: payloads_pb2.PromotionEnrollment(
            user_id=7, campaign_id=1, participation_order=1, enrolled_at=now
        ),
        registry.VOUCHER_ISSUED.name: payloads_pb2.VoucherIssued(
            voucher_id=1,
            code="CAKE-ABCDEFGH",
            user_id=7,
            campaign_id=1,
            discount_percentage="30.00",
            expires_at=now,
            issued_at=now,
        ),
        registry.VOUCHER_USED.name: payloads_pb2.VoucherUsed(
            voucher_id=1,
            code="CAKE-ABCDEFGH",
            user_id=7,
            transaction_id="TXN-1",
            used_amount="100.00",
            discount_amount="30.00",
            used_at=now,
        ),
        registry.PAYMENT_PROCESSED.name: payloads_pb2.PaymentProcessed(
            transaction_id="TXN-1",
            user_id=7,
            original_amount="100.00",
            discount_amount="30.00",
            final_amount="70.00",
            processed_at=now,
        ),
    }
    return samples[event.name]


@pytest.mark.parametrize("event", registry.PUBLISHED, ids=lambda e: e.name)
def test_an_envelope_round_trips_through_the_registry(
    event: registry.PublishedEvent[payloads_pb2.UserFirstLogin],
) -> None:
    payload = _sample(event)
    envelope = envelope_pb2.EventEnvelope(
        event_id=str(uuid.uuid4()),
        type=event.name,
        aggregate_type=event.aggregate_type,
        aggregate_id="7",
    )
    envelope.occurred_at.FromDatetime(datetime(2026, 12, 5, tzinfo=UTC))
    envelope.payload.Pack(payload)
    assert protovalidate.collect_violations(envelope) == []

    received = envelope_pb2.EventEnvelope.FromString(envelope.SerializeToString())
    spec = registry.BY_NAME[received.type]
    assert spec is event
    assert received.payload.TypeName() == spec.payload_type
    decoded = spec.payload()
    assert received.payload.Unpack(decoded)
    assert decoded == payload
    assert protovalidate.collect_violations(decoded) == []


# --- no registry fact is spelled outside the registry ----------------------------------------


def _forbidden() -> dict[str, str]:
    """Registry fact -> what it is."""
    facts: dict[str, str] = {}
    for event in registry.EVENTS:
        facts[event.name] = "event type"
        facts[envelope_pb2.EventType.Name(event.event_type)] = "event type"
        facts[event.payload_type] = "payload message name"
    for topic in (*registry.TOPICS, *registry.DEAD_LETTER_TOPICS):
        facts[topic] = "topic"
    for header in (
        registry.EVENT_ID_HEADER,
        registry.EVENT_TYPE_HEADER,
        registry.DEAD_LETTER_REASON_HEADER,
        registry.DEAD_LETTER_ORIGIN_HEADER,
        *registry.LEGACY_DEAD_LETTER_REASON_HEADERS,
        *registry.LEGACY_DEAD_LETTER_ORIGIN_HEADERS,
    ):
        facts[header] = "event header"
    facts[registry.DEAD_LETTER_TOPIC_SUFFIX] = "dead-letter suffix"
    return facts


FORBIDDEN = _forbidden()
_FACT = re.compile(
    "|".join(
        rf"(?<![\w.]){re.escape(fact)}(?![\w])" for fact in sorted(FORBIDDEN, key=len, reverse=True)
    )
)


def _string_literals(tree: ast.AST) -> Iterator[ast.Constant]:
    """The string and bytes constants of ``tree`` that are values, not documentation: a
    constant that is a statement of its own (a docstring, an attribute docstring under an
    assignment) is left out. One walk of the tree (the scan reads every module of the
    services, so a second walk would double its time)."""
    documentation: set[int] = set()
    constants: list[ast.Constant] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            if isinstance(node.value.value, str):
                documentation.add(id(node.value))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
            constants.append(node)
    return (node for node in constants if id(node) not in documentation)


def literals_outside_the_registry(source: str, filename: str) -> Iterator[str]:
    """``file:line: 'literal' (what)`` for each string literal of ``source`` that spells a
    registry fact or a Cake topic name, in full or inside a longer string."""
    for node in _string_literals(ast.parse(source, filename)):
        value = node.value
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        assert isinstance(value, str)
        found = _FACT.search(value)
        what = FORBIDDEN.get(found.group(0), "") if found else ""
        if found is None and (topic := _TOPIC_LIKE.search(value)) is not None:
            found, what = topic, "topic name"
        if found is not None:
            yield f"{filename}:{node.lineno}: {value[:80]!r} spells {found.group(0)!r} ({what})"


def _python_files() -> Iterator[Path]:
    """The scanned modules, except migrations: a migration is a snapshot of its day and must
    keep the names it was written with, whatever the registry says later."""
    for root in SCANNED:
        yield from sorted(p for p in root.rglob("*.py") if "migrations" not in p.parts)


def test_no_event_type_topic_or_header_is_spelled_outside_the_registry() -> None:
    files = list(_python_files())
    assert len(files) > 50, "the scan must see the services' source"
    found = [
        hit
        for path in files
        for hit in literals_outside_the_registry(
            path.read_text(), path.relative_to(ROOT).as_posix()
        )
    ]
    assert found == [], "use cake.events.v1.registry instead of:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "snippet",
    [
        'TYPE = "USER_FIRST_LOGIN"',
        'writer.add(s, event_type="EVENT_TYPE_VOUCHER_USED")',
        'topic = "cake.auth.user.v1"',
        'topic = "cake.billing.invoice.v2"',
        'dlq = f"{topic}.dlq"',
        'headers = [("cake_dlq_reason", b"x")]',
        'key = b"ce_id"',
        "sql = \"SELECT 1 FROM outbox WHERE event_type = 'SECURITY_AUDIT'\"",
        'payload_type = "cake.events.v1.PaymentProcessed"',
    ],
)
def test_the_scan_finds_a_literal(snippet: str) -> None:
    assert list(literals_outside_the_registry(snippet, "x.py")) != []


@pytest.mark.parametrize(
    "snippet",
    [
        '"""Docstring: the relay publishes USER_FIRST_LOGIN on cake.auth.user.v1."""',
        'def f():\n    """USER_FIRST_LOGIN goes to <topic>.dlq."""',
        'X = 1\n"""Attribute docstring naming ce_id."""',
        "# a comment: USER_FIRST_LOGIN\nx = registry.USER_FIRST_LOGIN.name",
        'status = "voucher_issued"',
        'service = "cake.auth.v1.AuthService"',
        'kind = "USER_FIRST_LOGIN_COUNT"',
        'pattern = "ce_identity"',
    ],
)
def test_the_scan_leaves_documentation_and_other_words_alone(snippet: str) -> None:
    assert list(literals_outside_the_registry(snippet, "x.py")) == []
