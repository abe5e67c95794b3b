"""The event registry, generated from the event options of the contracts.

``protos/cake/events/v1/options.proto`` declares two custom options: ``event`` on each value
of an event-type enum (payload message, topic or audit log, aggregate type) and ``event_bus``
on the enum itself (the dead-letter topic rule and the Kafka header names).
``protos/cake/events/v1/envelope.proto`` sets them on ``cake.events.v1.EventType``.
:func:`render` reads them from the compiled descriptor set and writes the Python module
``cake.events.v1.registry`` (``libs/protos/src/cake/events/v1/registry.py``), which every
producer and consumer reads instead of spelling event types, topics or headers itself.

Why a generated module and not a registry built at run time from the descriptors: the
generated one is plain, typed Python. mypy sees that ``registry.USER_FIRST_LOGIN.topic`` is a
``str`` and that its payload is ``UserFirstLogin`` (so an outbox write with another payload
fails type checking), importing it costs no descriptor walk, and the facts can be read in
one file. The protos stay the one place the facts are declared: this module only
transcribes them, ``cake-codegen --check`` fails when the two drift apart, and the rules
below refuse an event type that lacks a payload, a destination or an aggregate.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    empty_pb2,
    message,
    message_factory,
    unknown_fields,
)

EVENT_OPTION = "cake.events.v1.event"
"""The option on an event-type value (``EnumValueOptions``)."""
EVENT_BUS_OPTION = "cake.events.v1.event_bus"
"""The option on the event-type enum (``EnumOptions``)."""
MODULE_PATH = "cake/events/v1/registry.py"
"""Where the module goes, relative to the generated Python package root."""

# Kafka's legal topic characters (and at most 249 of them).
_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")
_LENGTH_DELIMITED = 2


class RegistryError(ValueError):
    """The contracts' event options break a registry rule; the message says which."""


@dataclass(frozen=True)
class _Event:
    name: str  # as on the wire: the value name without the enum's prefix
    value_name: str  # the enum value, e.g. EVENT_TYPE_USER_FIRST_LOGIN
    payload_module: str  # e.g. payloads_pb2
    payload_class: str  # e.g. UserFirstLogin
    payload_type: str  # e.g. cake.events.v1.UserFirstLogin
    aggregate_type: str
    topic: str  # "" when kept in the audit log


@dataclass(frozen=True)
class _Bus:
    dead_letter_topic_suffix: str
    event_id_header: str
    event_type_header: str
    dead_letter_reason_header: str
    dead_letter_origin_header: str
    legacy_dead_letter_reason_headers: tuple[str, ...]
    legacy_dead_letter_origin_headers: tuple[str, ...]


def _option_classes(
    file_set: descriptor_pb2.FileDescriptorSet,
) -> tuple[int, type[message.Message], int, type[message.Message]]:
    """(field number, message class) of the ``event`` and the ``event_bus`` options, built
    from this descriptor set (not from generated code, which may be the stale thing)."""
    pool = descriptor_pool.DescriptorPool()
    for file in file_set.file:
        pool.Add(file)
    found: dict[str, tuple[int, type[message.Message]]] = {}
    for file in file_set.file:
        for extension in file.extension:
            full_name = f"{file.package}.{extension.name}"
            if full_name in (EVENT_OPTION, EVENT_BUS_OPTION):
                option_type = pool.FindMessageTypeByName(extension.type_name.lstrip("."))
                found[full_name] = (
                    extension.number,
                    message_factory.GetMessageClass(option_type),
                )
    missing = {EVENT_OPTION, EVENT_BUS_OPTION} - set(found)
    if missing:
        raise RegistryError(f"the contracts do not declare {', '.join(sorted(missing))}")
    return (*found[EVENT_OPTION], *found[EVENT_BUS_OPTION])


def _option(
    options: message.Message, number: int, option: type[message.Message]
) -> message.Message | None:
    """The custom option ``number`` of ``options`` (a descriptor_pb2 options message, where
    it is an unknown field), parsed as ``option``; ``None`` if not set."""
    for field in _unknown_fields(options):
        if field.field_number == number and field.wire_type == _LENGTH_DELIMITED:
            return option.FromString(field.data)
    return None


def _unknown_fields(options: message.Message) -> list[Any]:
    """The fields of an options message as raw wire fields, custom options included.

    Re-read as ``google.protobuf.Empty``, every field is unknown, so this works whether or not
    the process has imported the generated ``options_pb2`` (which would make them known
    extensions of the descriptor messages).
    """
    fields = unknown_fields.UnknownFieldSet(empty_pb2.Empty.FromString(options.SerializeToString()))
    return [fields[index] for index in range(len(fields))]


def _get(option: message.Message, field: str) -> Any:
    """A field of an option message built from the descriptor set (no static type)."""
    return getattr(option, field)


def _upper_snake(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).upper()


def _messages(
    file_set: descriptor_pb2.FileDescriptorSet,
) -> dict[str, tuple[str, str, str]]:
    """Top-level message full name -> (Python package, module, class) of its generated code."""
    found = {}
    for file in file_set.file:
        package, _, module = file.name.removesuffix(".proto").rpartition("/")
        for message_type in file.message_type:
            found[f"{file.package}.{message_type.name}"] = (
                package.replace("/", "."),
                f"{module}_pb2",
                message_type.name,
            )
    return found


def _registry_enum(
    file_set: descriptor_pb2.FileDescriptorSet, bus_number: int
) -> tuple[descriptor_pb2.FileDescriptorProto, descriptor_pb2.EnumDescriptorProto]:
    candidates = [
        (file, enum)
        for file in file_set.file
        for enum in file.enum_type
        if any(f.field_number == bus_number for f in _unknown_fields(enum.options))
    ]
    if len(candidates) != 1:
        names = [f"{file.package}.{enum.name}" for file, enum in candidates]
        raise RegistryError(
            f"exactly one enum must set ({EVENT_BUS_OPTION}); found {names or 'none'}"
        )
    return candidates[0]


def _bus(option: message.Message | None) -> _Bus:
    if option is None:
        raise RegistryError(f"({EVENT_BUS_OPTION}) is not readable")
    bus = _Bus(
        dead_letter_topic_suffix=_get(option, "dead_letter_topic_suffix"),
        event_id_header=_get(option, "event_id_header"),
        event_type_header=_get(option, "event_type_header"),
        dead_letter_reason_header=_get(option, "dead_letter_reason_header"),
        dead_letter_origin_header=_get(option, "dead_letter_origin_header"),
        legacy_dead_letter_reason_headers=tuple(_get(option, "legacy_dead_letter_reason_headers")),
        legacy_dead_letter_origin_headers=tuple(_get(option, "legacy_dead_letter_origin_headers")),
    )
    for field in (
        "dead_letter_topic_suffix",
        "event_id_header",
        "event_type_header",
        "dead_letter_reason_header",
        "dead_letter_origin_header",
    ):
        if not getattr(bus, field):
            raise RegistryError(f"({EVENT_BUS_OPTION}).{field} is empty")
    return bus


def _events(
    enum: descriptor_pb2.EnumDescriptorProto,
    event_number: int,
    event_option: type[message.Message],
    messages: dict[str, tuple[str, str, str]],
    registry_package: str,
) -> list[_Event]:
    prefix = _upper_snake(enum.name) + "_"
    events = []
    for value in enum.value:
        spec = _option(value.options, event_number, event_option)
        where = f"{enum.name}.{value.name}"
        if value.number == 0:
            if spec is not None:
                raise RegistryError(f"{where} is the unspecified value: it names no event")
            continue
        if spec is None:
            raise RegistryError(f"{where} has no ({EVENT_OPTION}) option")
        payload: str = _get(spec, "payload")
        topic: str = _get(spec, "topic")
        aggregate_type: str = _get(spec, "aggregate_type")
        audit_log: bool = _get(spec, "audit_log")
        if payload not in messages:
            raise RegistryError(f"{where}: payload {payload!r} is not a top-level message")
        if bool(topic) == audit_log:
            raise RegistryError(f"{where} needs either a topic or audit_log: true, not both")
        if topic and not _TOPIC.fullmatch(topic):
            raise RegistryError(f"{where}: {topic!r} is not a legal Kafka topic name")
        if not aggregate_type:
            raise RegistryError(f"{where} has no aggregate_type")
        if not value.name.startswith(prefix):
            raise RegistryError(f"{where} does not start with {prefix}")
        package, module, class_name = messages[payload]
        if package != registry_package:
            raise RegistryError(f"{where}: payload {payload} is not in {registry_package}")
        events.append(
            _Event(
                name=value.name.removeprefix(prefix),
                value_name=value.name,
                payload_module=module,
                payload_class=class_name,
                payload_type=payload,
                aggregate_type=aggregate_type,
                topic=topic,
            )
        )
    return events


def _check_topics(events: Sequence[_Event], bus: _Bus) -> None:
    topics = {event.topic for event in events if event.topic}
    for topic in sorted(topics):
        dead_letters = topic + bus.dead_letter_topic_suffix
        if dead_letters in topics:
            raise RegistryError(f"{dead_letters} is both a topic and a dead-letter topic")
        if not _TOPIC.fullmatch(dead_letters):
            raise RegistryError(f"{dead_letters!r} is not a legal Kafka topic name")


def _literal(value: str) -> str:
    # json.dumps of a str is a valid, double-quoted Python string literal.
    return json.dumps(value)


def _tuple(items: Sequence[str], *, literals: bool = True) -> str:
    """A tuple expression, laid out as ruff formats it (one item per line unless short)."""
    rendered = [_literal(item) if literals else item for item in items]
    if not rendered:
        return "()"
    if len(rendered) == 1:
        return f"({rendered[0]},)"
    return "(\n" + "".join(f"    {item},\n" for item in rendered) + ")"


_HEADER = '''\
# Generated by cake-codegen from protos/; do not edit.
"""Cake's event registry: every event type, its payload message, its topic and dead-letter
topic, and the Kafka header names, as the contracts declare them (the ``event`` options of
``{enum}`` and its ``event_bus`` option, ``{enum_file}``).

Producers and consumers take these facts from here and spell none of them themselves (a test
fails on an event-type, topic or header literal anywhere else). To add an event type, add a
value with its ``event`` option to ``{enum}`` and run ``cake-codegen``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Generic, TypeVar

from google.protobuf.message import Message
'''

_BODY = '''_Payload = TypeVar("_Payload", bound=Message)

DEAD_LETTER_TOPIC_SUFFIX: Final = {suffix}
"""Dead letters of topic T go to T + this suffix, whoever parks them (relay or consumer)."""
EVENT_ID_HEADER: Final = {event_id_header}
"""Kafka header carrying the event id; consumers deduplicate on it."""
EVENT_TYPE_HEADER: Final = {event_type_header}
"""Kafka header carrying the event type name (``EventSpec.name``)."""
DEAD_LETTER_REASON_HEADER: Final = {reason_header}
"""Header of a dead letter: why it was parked."""
DEAD_LETTER_ORIGIN_HEADER: Final = {origin_header}
"""Header of a dead letter: where it was parked from."""
LEGACY_DEAD_LETTER_REASON_HEADERS: Final[tuple[str, ...]] = {legacy_reason}
"""Earlier names of the reason header: readers of dead letters accept them too."""
LEGACY_DEAD_LETTER_ORIGIN_HEADERS: Final[tuple[str, ...]] = {legacy_origin}
"""Earlier names of the origin header: readers of dead letters accept them too."""


def dead_letter_topic_for(topic: str) -> str:
    """The dead-letter topic of ``topic``: the one rule every writer of dead letters uses."""
    return topic + DEAD_LETTER_TOPIC_SUFFIX


@dataclass(frozen=True, slots=True)
class EventSpec(Generic[_Payload]):
    """One event type."""

    event_type: {enum_module}.{enum}.ValueType
    """The proto enum value."""
    name: str
    """Its name on the wire (outbox ``event_type``, envelope ``type``, ``EVENT_TYPE_HEADER``)."""
    payload: type[_Payload]
    """The payload message class."""
    payload_type: str
    """The payload message's full proto name (outbox ``payload_type``, ``Any`` type URL)."""
    aggregate_type: str
    """What the event is about (outbox and envelope ``aggregate_type``); its id is the key."""


@dataclass(frozen=True, slots=True)
class PublishedEvent(EventSpec[_Payload]):
    """An event type the relay publishes to Kafka."""

    topic: str
    dead_letter_topic: str


@dataclass(frozen=True, slots=True)
class AuditLogEvent(EventSpec[_Payload]):
    """An event type the relay keeps in the security audit log and publishes nowhere."""

'''

_FOOTER = '''
EVENTS: Final[tuple[EventSpec[Any], ...]] = {all_events}
"""Every event type, in the order of the enum."""
PUBLISHED: Final[tuple[PublishedEvent[Any], ...]] = {published}
"""The event types published to Kafka."""
AUDIT_LOG: Final[tuple[AuditLogEvent[Any], ...]] = {audit_log}
"""The event types kept in the security audit log."""
BY_NAME: Final[Mapping[str, EventSpec[Any]]] = MappingProxyType(
    {{spec.name: spec for spec in EVENTS}}
)
"""Event types by wire name."""
BY_TYPE: Final[Mapping[{enum_module}.{enum}.ValueType, EventSpec[Any]]] = MappingProxyType(
    {{spec.event_type: spec for spec in EVENTS}}
)
"""Event types by proto enum value."""
TOPICS: Final[tuple[str, ...]] = {topics}
"""The topics events are published to, each once, in the order of the enum."""
DEAD_LETTER_TOPICS: Final[tuple[str, ...]] = {dead_letter_topics}
"""The dead-letter topic of each of ``TOPICS``, in the same order."""
'''


def _spec(event: _Event, enum_module: str, bus: _Bus) -> Iterator[str]:
    kind = "PublishedEvent" if event.topic else "AuditLogEvent"
    payload = f"{event.payload_module}.{event.payload_class}"
    yield f"{event.name}: Final[{kind}[{payload}]] = {kind}("
    yield f"    event_type={enum_module}.{event.value_name},"
    yield f"    name={_literal(event.name)},"
    yield f"    payload={payload},"
    yield f"    payload_type={_literal(event.payload_type)},"
    yield f"    aggregate_type={_literal(event.aggregate_type)},"
    if event.topic:
        yield f"    topic={_literal(event.topic)},"
        yield f"    dead_letter_topic={_literal(event.topic + bus.dead_letter_topic_suffix)},"
    yield ")"


def render(file_set: descriptor_pb2.FileDescriptorSet) -> bytes:
    """The source of ``cake.events.v1.registry``; ``RegistryError`` if a rule is broken."""
    event_number, event_option, bus_number, bus_option = _option_classes(file_set)
    enum_file, enum = _registry_enum(file_set, bus_number)
    bus = _bus(_option(enum.options, bus_number, bus_option))
    registry_package = MODULE_PATH.rpartition("/")[0].replace("/", ".")
    enum_package, _, enum_module = enum_file.name.removesuffix(".proto").rpartition("/")
    enum_module += "_pb2"
    if enum_package.replace("/", ".") != registry_package:
        raise RegistryError(f"{enum.name} is not in {registry_package}")
    events = _events(enum, event_number, event_option, _messages(file_set), registry_package)
    if not events:
        raise RegistryError(f"{enum.name} declares no event")
    _check_topics(events, bus)

    modules = sorted({enum_module, *(event.payload_module for event in events)})
    topics = list(dict.fromkeys(event.topic for event in events if event.topic))
    published = [event for event in events if event.topic]
    kept = [event for event in events if not event.topic]
    lines = [
        _HEADER.format(enum=enum.name, enum_file=f"protos/{enum_file.name}"),
        f"from {registry_package} import {', '.join(modules)}\n",
        _BODY.format(
            suffix=_literal(bus.dead_letter_topic_suffix),
            event_id_header=_literal(bus.event_id_header),
            event_type_header=_literal(bus.event_type_header),
            reason_header=_literal(bus.dead_letter_reason_header),
            origin_header=_literal(bus.dead_letter_origin_header),
            legacy_reason=_tuple(bus.legacy_dead_letter_reason_headers),
            legacy_origin=_tuple(bus.legacy_dead_letter_origin_headers),
            enum_module=enum_module,
            enum=enum.name,
        ),
    ]
    for event in events:
        lines.append("\n".join(_spec(event, enum_module, bus)) + "\n")
    lines.append(
        _FOOTER.format(
            all_events=_tuple([event.name for event in events], literals=False),
            published=_tuple([event.name for event in published], literals=False),
            audit_log=_tuple([event.name for event in kept], literals=False),
            enum_module=enum_module,
            enum=enum.name,
            topics=_tuple(topics),
            dead_letter_topics=_tuple([t + bus.dead_letter_topic_suffix for t in topics]),
        )
    )
    return "\n".join(lines).encode()
