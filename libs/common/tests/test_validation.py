from __future__ import annotations

import sys
from typing import Any

import grpc
import pytest
from buf.validate import validate_pb2
from cake_common.errors import FieldViolation, InvalidArgument
from cake_common.grpc_server.interceptors import ValidationInterceptor
from cake_common.validation import RequestValidator
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto


def _registration_message_class() -> Any:
    """A throwaway message with buf.validate rules, built at run time (no cake.* protos)."""
    pool = descriptor_pool.Default()
    name = "cake_common_test.v1.Registration"
    try:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto(
        name="cake_common_test/v1/registration.proto",
        package="cake_common_test.v1",
        syntax="proto3",
        dependency=["buf/validate/validate.proto"],
    )
    item = file.message_type.add(name="Item")
    sku = item.field.add(name="sku", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    sku.options.Extensions[validate_pb2.field].string.min_len = 3

    message = file.message_type.add(name="Registration")
    email = message.field.add(name="email", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    email.options.Extensions[validate_pb2.field].string.email = True
    username = message.field.add(
        name="username", number=2, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL
    )
    username.options.Extensions[validate_pb2.field].string.pattern = "^[A-Za-z0-9_]{3,50}$"
    birthday = message.field.add(
        name="birthday", number=3, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL
    )
    birthday.options.Extensions[validate_pb2.field].required = True
    items = message.field.add(
        name="items",
        number=4,
        type=_F.TYPE_MESSAGE,
        type_name=".cake_common_test.v1.Item",
        label=_F.LABEL_REPEATED,
    )
    del items  # rules live on Item.sku
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


def test_valid_message_passes() -> None:
    registration = _registration_message_class()
    RequestValidator().validate(
        registration(email="a@example.com", username="alice_1", birthday="1990-01-01")
    )


def test_one_violation_per_bad_field() -> None:
    registration = _registration_message_class()
    message = registration(email="not-an-email", username="a!", birthday="")
    message.items.add(sku="ok-sku")
    message.items.add(sku="x")
    with pytest.raises(InvalidArgument) as caught:
        RequestValidator().validate(message)
    error = caught.value
    assert error.message == "Validation failed"
    fields = [violation.field for violation in error.violations]
    assert sorted(fields) == ["birthday", "email", "items[1].sku", "username"]
    assert all(isinstance(v, FieldViolation) and v.description for v in error.violations)


def test_validator_is_built_lazily_and_reused() -> None:
    validator = RequestValidator()
    assert validator._validator is None
    validator.violations(_registration_message_class()(email="a@example.com"))
    built = validator._validator
    assert built is not None
    validator.violations(_registration_message_class()())
    assert validator._validator is built


@pytest.mark.slow  # a fresh interpreter
def test_import_does_not_load_protovalidate() -> None:
    import subprocess

    code = (
        "import sys, cake_common.validation, cake_common.grpc_server;"
        "sys.exit('protovalidate' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_a_field_breaking_several_rules_gets_one_violation() -> None:
    from cake.auth.v1 import auth_pb2

    request = auth_pb2.RegisterRequest(
        fullname="",  # too short AND blank: two rules, one field
        email="ann@example.com",
        username="ann_lee",
        phone="+84901234567",
        password="secret-123",
        birthday="1995-06-01",
    )
    violations = RequestValidator().violations(request)
    assert [v.field for v in violations] == ["fullname"]
    assert ";" in violations[0].description


def _empty_message_classes() -> tuple[Any, Any]:
    """Two messages without fields: one bare, one with a message-level CEL rule."""
    pool = descriptor_pool.Default()
    names = ("cake_common_test.v1.Bare", "cake_common_test.v1.NeverValid")
    try:
        return tuple(  # type: ignore[return-value]
            message_factory.GetMessageClass(pool.FindMessageTypeByName(name)) for name in names
        )
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto(
        name="cake_common_test/v1/empty.proto",
        package="cake_common_test.v1",
        syntax="proto3",
        dependency=["buf/validate/validate.proto"],
    )
    file.message_type.add(name="Bare")
    never = file.message_type.add(name="NeverValid")
    never.options.Extensions[validate_pb2.message].cel.add(
        id="never", message="never valid", expression="false"
    )
    pool.Add(file)
    return tuple(  # type: ignore[return-value]
        message_factory.GetMessageClass(pool.FindMessageTypeByName(name)) for name in names
    )


def test_requests_without_fields_or_options_skip_validation_the_others_do_not() -> None:
    bare, never_valid = _empty_message_classes()
    interceptor = ValidationInterceptor(RequestValidator())

    async def behaviour(request: Any, context: Any) -> None:
        return None

    def handler(message_class: Any) -> Any:
        return grpc.unary_unary_rpc_method_handler(
            behaviour, request_deserializer=message_class.FromString
        )

    assert interceptor.scope_for_handler("/t.S/Bare", handler(bare)) is None
    assert interceptor.scope_for_handler("/t.S/Rules", handler(_registration_message_class()))
    # No field, but a message-level rule: still checked, and refused.
    assert interceptor.scope_for_handler("/t.S/Never", handler(never_valid)) is not None
    with pytest.raises(InvalidArgument):
        RequestValidator().validate(never_valid())
