"""The event registry generator: what it reads from the event options and what it refuses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cake.events.v1 import options_pb2
from cake_devtools import codegen, event_registry
from google.protobuf import descriptor_pb2

ROOT = codegen.find_root(Path(__file__).resolve().parent)
LAYOUT = codegen.Layout(root=ROOT)
ENVELOPE = "cake/events/v1/envelope.proto"


@pytest.fixture
def file_set() -> descriptor_pb2.FileDescriptorSet:
    """The contracts as compiled by the last ``cake-codegen`` (a fresh copy per test)."""
    return descriptor_pb2.FileDescriptorSet.FromString(LAYOUT.descriptor_out.read_bytes())


def _event_type(file_set: descriptor_pb2.FileDescriptorSet) -> descriptor_pb2.EnumDescriptorProto:
    (envelope,) = (f for f in file_set.file if f.name == ENVELOPE)
    (enum,) = (e for e in envelope.enum_type if e.name == "EventType")
    return enum


def _value(
    file_set: descriptor_pb2.FileDescriptorSet, name: str
) -> descriptor_pb2.EnumValueDescriptorProto:
    (value,) = (v for v in _event_type(file_set).value if v.name == name)
    return value


def _set_event(value: descriptor_pb2.EnumValueDescriptorProto, **spec: object) -> None:
    options = descriptor_pb2.EnumValueOptions()
    options.Extensions[options_pb2.event].CopyFrom(options_pb2.EventSpec(**spec))
    value.options.ParseFromString(options.SerializeToString())


def _namespace(source: bytes) -> dict[str, object]:
    namespace: dict[str, object] = {}
    exec(compile(source, event_registry.MODULE_PATH, "exec"), namespace)
    return namespace


def test_the_module_transcribes_the_options(file_set: descriptor_pb2.FileDescriptorSet) -> None:
    _set_event(
        _value(file_set, "EVENT_TYPE_VOUCHER_USED"),
        payload="cake.events.v1.VoucherUsed",
        topic="cake.promotions.spent.v2",
        aggregate_type="voucher",
    )
    registry = _namespace(event_registry.render(file_set))

    used = registry["VOUCHER_USED"]
    assert (used.name, used.topic, used.dead_letter_topic, used.aggregate_type) == (
        "VOUCHER_USED",
        "cake.promotions.spent.v2",
        "cake.promotions.spent.v2.dlq",
        "voucher",
    )
    assert used.payload.DESCRIPTOR.full_name == "cake.events.v1.VoucherUsed"
    assert registry["TOPICS"] == (
        "cake.auth.user.v1",
        "cake.promotions.voucher.v1",
        "cake.promotions.spent.v2",
        "cake.promotions.payment.v1",
    )
    assert registry["AUDIT_LOG"] == (registry["SECURITY_AUDIT"],)
    assert registry["DEAD_LETTER_REASON_HEADER"] == "cake_dead_letter_reason"


@pytest.mark.parametrize(
    ("value", "spec", "complaint"),
    [
        ("EVENT_TYPE_VOUCHER_USED", None, "has no (cake.events.v1.event) option"),
        (
            "EVENT_TYPE_VOUCHER_USED",
            {"payload": "cake.events.v1.Nope", "topic": "t", "aggregate_type": "user"},
            "is not a top-level message",
        ),
        (
            "EVENT_TYPE_VOUCHER_USED",
            {"payload": "cake.events.v1.VoucherUsed", "aggregate_type": "user"},
            "either a topic or audit_log",
        ),
        (
            "EVENT_TYPE_SECURITY_AUDIT",
            {
                "payload": "cake.events.v1.SecurityAudit",
                "topic": "cake.audit.v1",
                "audit_log": True,
                "aggregate_type": "user",
            },
            "either a topic or audit_log",
        ),
        (
            "EVENT_TYPE_VOUCHER_USED",
            {"payload": "cake.events.v1.VoucherUsed", "topic": "a topic", "aggregate_type": "u"},
            "not a legal Kafka topic",
        ),
        (
            "EVENT_TYPE_VOUCHER_USED",
            {"payload": "cake.events.v1.VoucherUsed", "topic": "cake.auth.user.v1"},
            "has no aggregate_type",
        ),
        (
            "EVENT_TYPE_VOUCHER_USED",
            {
                "payload": "cake.events.v1.VoucherUsed",
                "topic": "cake.auth.user.v1.dlq",
                "aggregate_type": "user",
            },
            "is both a topic and a dead-letter topic",
        ),
        (
            "EVENT_TYPE_UNSPECIFIED",
            {"payload": "cake.events.v1.VoucherUsed", "topic": "t", "aggregate_type": "user"},
            "is the unspecified value",
        ),
    ],
)
def test_an_event_type_that_breaks_a_rule_is_refused(
    file_set: descriptor_pb2.FileDescriptorSet,
    value: str,
    spec: dict[str, object] | None,
    complaint: str,
) -> None:
    target = _value(file_set, value)
    if spec is None:
        target.ClearField("options")
    else:
        _set_event(target, **spec)
    with pytest.raises(event_registry.RegistryError, match=re.escape(complaint)):
        event_registry.render(file_set)


def test_an_enum_without_the_bus_option_is_no_registry(
    file_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    _event_type(file_set).ClearField("options")
    with pytest.raises(event_registry.RegistryError, match="exactly one enum must set"):
        event_registry.render(file_set)


def test_an_empty_header_name_is_refused(file_set: descriptor_pb2.FileDescriptorSet) -> None:
    enum = _event_type(file_set)
    options = descriptor_pb2.EnumOptions()
    options.Extensions[options_pb2.event_bus].CopyFrom(
        options_pb2.EventBus(
            dead_letter_topic_suffix=".dlq",
            event_id_header="ce_id",
            event_type_header="",
            dead_letter_reason_header="r",
            dead_letter_origin_header="o",
        )
    )
    enum.options.ParseFromString(options.SerializeToString())
    with pytest.raises(event_registry.RegistryError, match="event_type_header is empty"):
        event_registry.render(file_set)
