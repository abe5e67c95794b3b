"""Request validation against the ``buf.validate`` rules declared in the protos."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message

from cake_common.errors import FieldViolation, InvalidArgument

if TYPE_CHECKING:
    from protovalidate import Validator

VALIDATION_FAILED_MESSAGE = "Validation failed"


def _field_path(elements: Iterable[Any]) -> str:
    """``buf.validate.FieldPath`` elements as ``a.b[0].c`` / ``labels["k"]``."""
    path = ""
    for element in elements:
        path += f".{element.field_name}" if path else element.field_name
        subscript = element.subscript  # a protobuf-py Oneof (field, value), or None
        if subscript is None:
            continue
        key = subscript.value
        if subscript.field == "index" or not isinstance(key, str):
            path += f"[{key}]"
        else:
            path += f'["{key}"]'
    return path


class RequestValidator:
    """Checks messages with protovalidate; one instance per process, reused for every call.

    The protovalidate ``Validator`` compiles and caches CEL programs per message type, so it
    is built on first use (not at import) and then shared.
    """

    def __init__(self) -> None:
        self._validator: Validator | None = None

    def _get_validator(self) -> Validator:
        if self._validator is None:
            # Imported here: importing protovalidate builds a module-level default validator.
            import protovalidate

            self._validator = protovalidate.Validator()
        return self._validator

    def violations(self, message: Message) -> list[FieldViolation]:
        """One :class:`FieldViolation` per bad field, in message order; a field that breaks
        several rules (an empty name: too short AND blank) gets them in one description."""
        by_field: dict[str, list[str]] = {}
        for violation in self._get_validator().collect_violations(message):
            field = violation.proto.field
            path = _field_path(field.elements if field is not None else ())
            descriptions = by_field.setdefault(path, [])
            description = violation.proto.message or violation.proto.rule_id
            if description not in descriptions:
                descriptions.append(description)
        return [
            FieldViolation(field=field, description="; ".join(descriptions))
            for field, descriptions in by_field.items()
        ]

    def validate(self, message: Message) -> None:
        """Raise ``InvalidArgument("Validation failed", violations)`` if the message is invalid."""
        violations = self.violations(message)
        if violations:
            raise InvalidArgument(VALIDATION_FAILED_MESSAGE, violations)
