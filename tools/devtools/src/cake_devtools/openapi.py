"""OpenAPI 3 description of the REST API the gateway serves, generated from the contracts.

``cake-codegen`` writes it to ``gateway/generated/openapi.json`` (``--check`` fails when it is
stale) and Envoy serves that file at ``GET /openapi.json``. Everything comes from the
descriptor set: paths and verbs from the ``google.api.http`` rules, schemas from the messages
(proto3 JSON mapping: lowerCamelCase names, 64-bit integers as strings, timestamps as RFC 3339
strings), constraints from the ``buf.validate`` rules, descriptions from the proto comments,
and what only the gateway decides (public methods, 201 statuses, bare objects and arrays
instead of the response wrappers) from :mod:`cake_devtools.gateway_config`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from cake_devtools.gateway_config import (
    OPENAPI_REST_PATH,
    TRANSCODED_SERVICES,
    RestMethod,
    json_name,
    rest_methods,
)

OPENAPI_VERSION = "3.0.3"
API_TITLE = "Cake REST API"
API_VERSION = "1.0.0"
STATUS_SCHEMA = "google.rpc.Status"
INT64_PATTERN = r"^-?[0-9]+$"
UINT64_PATTERN = r"^[0-9]+$"

Schema = dict[str, Any]

_FIELD = descriptor_pb2.FieldDescriptorProto
_SCALARS: Mapping[int, Schema] = {
    _FIELD.TYPE_DOUBLE: {"type": "number", "format": "double"},
    _FIELD.TYPE_FLOAT: {"type": "number", "format": "float"},
    _FIELD.TYPE_INT32: {"type": "integer", "format": "int32"},
    _FIELD.TYPE_SINT32: {"type": "integer", "format": "int32"},
    _FIELD.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    _FIELD.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    _FIELD.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    # The proto3 JSON mapping prints 64-bit integers as strings (JavaScript numbers lose
    # precision above 2^53); the parser accepts both.
    _FIELD.TYPE_INT64: {"type": "string", "format": "int64", "pattern": INT64_PATTERN},
    _FIELD.TYPE_SINT64: {"type": "string", "format": "int64", "pattern": INT64_PATTERN},
    _FIELD.TYPE_SFIXED64: {"type": "string", "format": "int64", "pattern": INT64_PATTERN},
    _FIELD.TYPE_UINT64: {"type": "string", "format": "uint64", "pattern": UINT64_PATTERN},
    _FIELD.TYPE_FIXED64: {"type": "string", "format": "uint64", "pattern": UINT64_PATTERN},
    _FIELD.TYPE_BOOL: {"type": "boolean"},
    _FIELD.TYPE_STRING: {"type": "string"},
    _FIELD.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_WELL_KNOWN: Mapping[str, Schema] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?s$"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "additionalProperties": True,
    },
    "google.protobuf.StringValue": {"type": "string"},
    "google.protobuf.BoolValue": {"type": "boolean"},
    "google.protobuf.DoubleValue": {"type": "number"},
    "google.protobuf.Int32Value": {"type": "integer", "format": "int32"},
}
#: Error statuses every route can answer, with what causes them at the gateway or services.
_COMMON_ERRORS: Mapping[int, str] = {
    429: "Too many requests from this client address (rate limit; see x-ratelimit-* headers)",
    503: "A service or its database is unavailable",
}

SECURITY_SCHEME = "bearerAuth"
#: Request headers the API reads besides Authorization (``components.parameters``).
REQUEST_ID_PARAMETER = "RequestId"
IDEMPOTENCY_KEY_PARAMETER = "IdempotencyKey"
#: What the services accept as a client's request id (cake_common's request-id interceptor);
#: anything else is replaced by a new id.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:/+=\-]{1,128}$"
#: The promotions service's limit on an Idempotency-Key (printable characters).
IDEMPOTENCY_KEY_MAX_LENGTH = 255
#: Methods that honour an ``Idempotency-Key`` request header and answer a replay with
#: ``Idempotent-Replayed: true``.
IDEMPOTENT_METHODS: frozenset[str] = frozenset({"cake.promotions.v1.PromotionsService/Topup"})
#: Response headers (``components.headers``) every answer carries: the request id (Envoy's
#: ``always_set_request_id_in_response``) and the rate limiter's state
#: (``enable_x_ratelimit_headers: DRAFT_VERSION_03``).
COMMON_RESPONSE_HEADERS: tuple[str, ...] = (
    "x-request-id",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
)
#: Answers that carry ``Retry-After`` (seconds): a refused login while the account is locked,
#: a top-up whose bank answer is pending, and a retry of it while it still is.
RETRY_AFTER_RESPONSES: Mapping[str, frozenset[int]] = {
    "cake.auth.v1.AuthService/Login": frozenset({429}),
    "cake.promotions.v1.PromotionsService/Topup": frozenset({409, 503}),
}


def _response_headers() -> dict[str, Schema]:
    integer = {"type": "integer", "minimum": 0}
    return {
        "x-request-id": {
            "description": "The request's id (the client's when it matches the accepted "
            "form, otherwise one the gateway made); every log line about the request has it.",
            "schema": {"type": "string"},
        },
        "x-ratelimit-limit": {
            "description": "Requests this client address may make per window of the bucket "
            "the request drew from.",
            "schema": integer,
        },
        "x-ratelimit-remaining": {
            "description": "Requests left in the current window.",
            "schema": integer,
        },
        "x-ratelimit-reset": {
            "description": "Seconds until the bucket refills.",
            "schema": integer,
        },
        "Retry-After": {
            "description": "Seconds to wait before retrying.",
            "schema": {"type": "integer", "minimum": 1},
        },
        "Idempotent-Replayed": {
            "description": "`true` when this is the stored answer to an earlier request with "
            "the same Idempotency-Key (nothing was charged again); absent otherwise.",
            "schema": {"type": "string", "enum": ["true"]},
        },
    }


def _request_parameters() -> dict[str, Schema]:
    return {
        REQUEST_ID_PARAMETER: {
            "name": "x-request-id",
            "in": "header",
            "required": False,
            "description": "An id to correlate the request's log lines; echoed in the "
            "response. A value that does not match the pattern is replaced by a new id.",
            "schema": {"type": "string", "pattern": REQUEST_ID_PATTERN},
        },
        IDEMPOTENCY_KEY_PARAMETER: {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "description": "A key of the client's choosing (e.g. a UUID) that makes a retry "
            "safe: a request repeated with the same key and body returns the first answer "
            "(with `Idempotent-Replayed: true`) instead of running again; the same key with a "
            "different body is 409.",
            "schema": {"type": "string", "minLength": 1, "maxLength": IDEMPOTENCY_KEY_MAX_LENGTH},
        },
    }


def _header_refs(names: Iterable[str]) -> dict[str, Schema]:
    return {name: {"$ref": f"#/components/headers/{name}"} for name in names}


#: A sentence ends at `.`, `!` or `?` followed by a capital or a quote; "e.g. the" goes on.
_SENTENCE_END = re.compile(r"(.+?[.!?])\s+(?=[A-Z`\"'])")


def summary_and_description(comment: str) -> tuple[str, str]:
    """An RPC comment as OpenAPI text: the first sentence as the summary, and the whole comment
    as the description (paragraphs kept, lines of a paragraph joined)."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", comment) if p.strip()]
    if not paragraphs:
        return "", ""
    first = _SENTENCE_END.match(paragraphs[0])
    return (first.group(1) if first else paragraphs[0]), "\n\n".join(paragraphs)


#: Errors the Cake API documents for particular methods with their messages.
DOCUMENTED_ERRORS: Mapping[str, Mapping[int, str]] = {
    "cake.auth.v1.AuthService/Register": {
        409: "`Username already exists`, `Email already exists` or `Phone number already exists`"
    },
    "cake.auth.v1.AuthService/Login": {
        401: "`Invalid credentials`",
        429: "Too many requests, or too many failed logins for the account",
    },
    "cake.auth.v1.AuthService/UpdateProfile": {
        409: "`Email already exists` or `Phone number already exists`"
    },
    "cake.promotions.v1.PromotionsService/GetCampaign": {404: "`Campaign not found`"},
    "cake.promotions.v1.PromotionsService/UpdateCampaignStatus": {404: "`Campaign not found`"},
    "cake.promotions.v1.PromotionsService/ValidateVoucher": {404: "`Voucher not found`"},
    "cake.promotions.v1.PromotionsService/Topup": {
        400: "Invalid request, or `Voucher does not belong to this user`, `Voucher is expired "
        "or already used`, `Minimum top-up amount for this voucher is X`, `Payment processing "
        "failed`",
        404: "`Invalid voucher code`",
        409: "The Idempotency-Key was used for a different top-up",
    },
    "cake.events.v1.EventAdminService/ReplayEvent": {404: "No dead letter has that event id"},
}


class _Contracts:
    """Messages, enums and comments of a descriptor set, looked up by full name."""

    def __init__(self, file_set: descriptor_pb2.FileDescriptorSet) -> None:
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
        self.comments: dict[tuple[str, ...], str] = {}
        self._field_rules = _FieldRules(file_set)
        for file in file_set.file:
            prefix = f"{file.package}." if file.package else ""
            self._index(file, prefix)

    def _index(self, file: descriptor_pb2.FileDescriptorProto, prefix: str) -> None:
        comments = {
            tuple(location.path): location.leading_comments.strip()
            for location in file.source_code_info.location
            if location.leading_comments.strip()
        }

        def walk(
            messages: Iterable[descriptor_pb2.DescriptorProto], scope: str, path: tuple[int, ...]
        ) -> None:
            for index, message in enumerate(messages):
                name = scope + message.name
                message_path = (*path, index)
                self.messages[name] = message
                if message_path in comments:
                    self.comments[(name,)] = comments[message_path]
                for field_index, field in enumerate(message.field):
                    comment = comments.get((*message_path, 2, field_index))
                    if comment:
                        self.comments[(name, field.name)] = comment
                for enum in message.enum_type:
                    self.enums[f"{name}.{enum.name}"] = enum
                walk(message.nested_type, f"{name}.", (*message_path, 3))

        walk(file.message_type, prefix, (4,))
        for enum in file.enum_type:
            self.enums[prefix + enum.name] = enum
        for service_index, service in enumerate(file.service):
            for method_index, method in enumerate(service.method):
                comment = comments.get((6, service_index, 2, method_index))
                if comment:
                    self.comments[(f"{prefix}{service.name}/{method.name}",)] = comment

    def rules(self, field: descriptor_pb2.FieldDescriptorProto) -> Schema:
        return self._field_rules.schema_of(field)


class _FieldRules:
    """JSON-schema constraints from a field's ``buf.validate.field`` option.

    The option is read with classes built from the descriptor set itself, so it works whether
    or not generated ``buf.validate`` code is importable (codegen may be producing it).
    """

    def __init__(self, file_set: descriptor_pb2.FileDescriptorSet) -> None:
        self._options_class: Any = None
        self._extension: Any = None
        if not any(f.name == "buf/validate/validate.proto" for f in file_set.file):
            return
        pool = descriptor_pool.DescriptorPool()
        for file in _dependency_order(file_set):
            pool.Add(file)
        self._options_class = message_factory.GetMessageClass(
            pool.FindMessageTypeByName("google.protobuf.FieldOptions")
        )
        self._extension = pool.FindExtensionByName("buf.validate.field")

    def schema_of(self, field: descriptor_pb2.FieldDescriptorProto) -> Schema:
        if self._options_class is None or not field.HasField("options"):
            return {}
        options = self._options_class.FromString(field.options.SerializeToString())
        if not options.HasExtension(self._extension):
            return {}
        rules = options.Extensions[self._extension]
        schema: Schema = {}
        if rules.required:
            schema["x-required"] = True
        kind = rules.WhichOneof("type")
        if kind is None:
            return schema
        typed = getattr(rules, kind)
        if kind == "string":
            schema.update(_string_rules(typed))
        elif kind in ("int32", "int64", "uint32", "uint64", "double", "float"):
            schema.update(_number_rules(typed, as_string=kind in ("int64", "uint64")))
        return schema


def _string_rules(rules: Any) -> Schema:
    schema: Schema = {}
    if rules.HasField("min_len"):
        schema["minLength"] = rules.min_len
    if rules.HasField("max_len"):
        schema["maxLength"] = rules.max_len
    if rules.HasField("pattern"):
        schema["pattern"] = rules.pattern
    if rules.HasField("email") and rules.email:
        schema["format"] = "email"
    if rules.HasField("uuid") and rules.uuid:
        schema["format"] = "uuid"
    allowed = list(getattr(rules, "in"))
    if allowed:
        schema["enum"] = allowed
    return schema


def _number_rules(rules: Any, *, as_string: bool) -> Schema:
    if as_string:
        return {}  # 64-bit integers are strings in JSON: bounds cannot be stated
    schema: Schema = {}
    lower = rules.WhichOneof("greater_than")
    upper = rules.WhichOneof("less_than")
    if lower is not None:
        schema["minimum"] = getattr(rules, lower)
        if lower == "gt":
            schema["exclusiveMinimum"] = True
    if upper is not None:
        schema["maximum"] = getattr(rules, upper)
        if upper == "lt":
            schema["exclusiveMaximum"] = True
    return schema


def _dependency_order(
    file_set: descriptor_pb2.FileDescriptorSet,
) -> list[descriptor_pb2.FileDescriptorProto]:
    by_name = {file.name: file for file in file_set.file}
    ordered: list[descriptor_pb2.FileDescriptorProto] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name not in by_name:
            return
        seen.add(name)
        for dependency in by_name[name].dependency:
            visit(dependency)
        ordered.append(by_name[name])

    for name in by_name:
        visit(name)
    return ordered


class _SchemaBuilder:
    """Component schemas for the messages the API uses, added as they are referenced."""

    def __init__(self, contracts: _Contracts) -> None:
        self._contracts = contracts
        self.components: dict[str, Schema] = {}

    def ref(self, message_name: str) -> Schema:
        if message_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message_name])
        if message_name not in self.components:
            self.components[message_name] = {}  # placeholder: recursion stops here
            self.components[message_name] = self.message_schema(message_name)
        return {"$ref": f"#/components/schemas/{message_name}"}

    def message_schema(
        self, message_name: str, *, exclude: Sequence[str] = (), request: bool = False
    ) -> Schema:
        message = self._contracts.messages[message_name]
        properties: dict[str, Schema] = {}
        required: list[str] = []
        for field in message.field:
            if field.name in exclude:
                continue
            name = field.json_name or json_name(field.name)
            properties[name] = self.field_schema(message_name, field)
            marked_required = properties[name].pop("x-required", False)
            # Requests: what validation demands; responses: what the gateway always prints.
            if marked_required if request else _always_printed(field):
                required.append(name)
        schema: Schema = {"type": "object", "properties": properties}
        if request:
            # The gateway rejects unknown JSON fields with 400.
            schema["additionalProperties"] = False
        if required:
            schema["required"] = required
        description = self._contracts.comments.get((message_name,))
        if description:
            schema["description"] = description
        return schema

    def field_schema(self, message_name: str, field: descriptor_pb2.FieldDescriptorProto) -> Schema:
        schema = self._value_schema(field)
        rules = self._contracts.rules(field)
        if field.label == _FIELD.LABEL_REPEATED and not self._is_map(field):
            required = rules.pop("x-required", None)
            schema = {"type": "array", "items": {**schema, **rules}}
            if required:
                schema["x-required"] = True
        elif "$ref" in schema and rules:
            schema = {"allOf": [schema], **rules}
        else:
            schema.update(rules)
        description = self._contracts.comments.get((message_name, field.name))
        if description:
            if "$ref" in schema:
                schema = {"allOf": [schema]}
            schema["description"] = description
        return schema

    def _is_map(self, field: descriptor_pb2.FieldDescriptorProto) -> bool:
        if field.type != _FIELD.TYPE_MESSAGE:
            return False
        entry = self._contracts.messages.get(field.type_name.lstrip("."))
        return entry is not None and entry.options.map_entry

    def _value_schema(self, field: descriptor_pb2.FieldDescriptorProto) -> Schema:
        if field.type == _FIELD.TYPE_ENUM:
            enum = self._contracts.enums[field.type_name.lstrip(".")]
            return {"type": "string", "enum": [value.name for value in enum.value]}
        if field.type == _FIELD.TYPE_MESSAGE:
            type_name = field.type_name.lstrip(".")
            if self._is_map(field):
                entry = self._contracts.messages[type_name]
                value_field = next(f for f in entry.field if f.name == "value")
                return {"type": "object", "additionalProperties": self._value_schema(value_field)}
            return self.ref(type_name)
        return dict(_SCALARS[field.type])


def _always_printed(field: descriptor_pb2.FieldDescriptorProto) -> bool:
    """The gateway prints fields without presence even at their default value."""
    if field.label == _FIELD.LABEL_REPEATED:
        return True
    has_presence = field.proto3_optional or field.HasField("oneof_index")
    return not has_presence and field.type != _FIELD.TYPE_MESSAGE


def _status_schema() -> Schema:
    return {
        "type": "object",
        "description": "google.rpc.Status: the gRPC status code, a message for developers and "
        "typed details (e.g. google.rpc.BadRequest with the invalid fields).",
        "properties": {
            "code": {"type": "integer", "format": "int32"},
            "message": {"type": "string"},
            "details": {"type": "array", "items": _WELL_KNOWN["google.protobuf.Any"]},
        },
        "required": ["code", "message", "details"],
    }


def _error(description: str) -> Schema:
    return {
        "description": description,
        "headers": _header_refs(COMMON_RESPONSE_HEADERS),
        "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{STATUS_SCHEMA}"}}
        },
    }


OAUTH_ERROR_SCHEMA = "OAuthError"
BASIC_SECURITY_SCHEME = "clientBasic"


def _oauth_error_schema() -> Schema:
    return {
        "type": "object",
        "description": "An RFC 6749 section 5.2 error (the token endpoint's only error shape).",
        "properties": {
            "error": {
                "type": "string",
                "enum": [
                    "invalid_request",
                    "invalid_client",
                    "invalid_grant",
                    "unauthorized_client",
                    "unsupported_grant_type",
                    "invalid_scope",
                ],
            },
            "error_description": {"type": "string"},
        },
        "required": ["error", "error_description"],
    }


def _oauth_error(description: str) -> Schema:
    return {
        "description": description,
        "headers": _header_refs(COMMON_RESPONSE_HEADERS),
        "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{OAUTH_ERROR_SCHEMA}"}}
        },
    }


def _oauth_token_operation(
    operation: Schema, contracts: _Contracts, schemas: _SchemaBuilder
) -> None:
    """``POST /oauth/token`` follows RFC 6749, not Cake's JSON conventions: a form body,
    client authentication by HTTP Basic or the body, RFC errors."""
    request = contracts.messages["cake.auth.v1.TokenRequest"]
    operation["requestBody"] = {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "properties": {
                        field.name: {"type": "string"}
                        for field in request.field
                        if field.type != _FIELD.TYPE_MESSAGE
                    },
                    "required": ["grant_type"],
                }
            }
        },
    }
    operation["security"] = [{}, {BASIC_SECURITY_SCHEME: []}]
    responses = operation["responses"]
    responses["400"] = _oauth_error(
        "invalid_request, invalid_scope or unsupported_grant_type (RFC 6749 section 5.2)"
    )
    responses["401"] = _oauth_error(
        "invalid_client: unknown client, wrong secret or disabled account (with "
        "WWW-Authenticate: Basic)"
    )


def _parameters(method: RestMethod, contracts: _Contracts, schemas: _SchemaBuilder) -> list[Schema]:
    """Path parameters, and for body-less methods the scalar fields as query parameters."""
    request = contracts.messages[method.request_type]
    parameters: list[Schema] = []
    for field in request.field:
        in_path = field.name in method.path_params
        if not in_path and (method.body or field.type == _FIELD.TYPE_MESSAGE):
            continue
        schema = schemas.field_schema(method.request_type, field)
        schema.pop("x-required", None)
        parameters.append(
            {
                "name": field.name if in_path else field.json_name or json_name(field.name),
                "in": "path" if in_path else "query",
                "required": in_path,
                "schema": schema,
            }
        )
    return parameters


def _success_schema(method: RestMethod, contracts: _Contracts, schemas: _SchemaBuilder) -> Schema:
    """The response message, or the field the gateway returns bare instead of its wrapper."""
    if not method.response_body:
        return schemas.ref(method.response_type)
    response = contracts.messages[method.response_type]
    field = next(f for f in response.field if f.name == method.response_body)
    schema = schemas.field_schema(method.response_type, field)
    schema.pop("description", None)
    if list(schema) == ["allOf"] and len(schema["allOf"]) == 1:
        return dict(schema["allOf"][0])  # only wrapped to carry the field's description
    return schema


def _responses(method: RestMethod, body_schema: Schema) -> Schema:
    content = {"application/json": {"schema": body_schema}}
    success_headers = list(COMMON_RESPONSE_HEADERS)
    if method.full_name in IDEMPOTENT_METHODS:
        success_headers.append("Idempotent-Replayed")
    responses: dict[str, Schema] = {
        str(method.success_status): {
            "description": "OK" if method.success_status == 200 else "Created",
            "headers": _header_refs(success_headers),
            "content": content,
        }
    }
    if method.is_health:
        responses["503"] = {
            "description": "A service or its database is down (status `unhealthy`)",
            "headers": _header_refs(COMMON_RESPONSE_HEADERS),
            "content": content,
        }
    # Unknown query parameters are rejected everywhere.
    responses["400"] = _error(
        "Invalid request: malformed JSON, unknown field or query parameter, or field "
        "violations (google.rpc.BadRequest in the details)"
    )
    if not method.public:
        responses["401"] = _error("Missing, invalid, expired or revoked bearer token")
        responses["403"] = _error("The caller's role may not do this")
    if method.path_params:
        responses["404"] = _error("Not found")
    for status, description in DOCUMENTED_ERRORS.get(method.full_name, {}).items():
        responses[str(status)] = _error(description)
    if method.body:
        responses["413"] = _error("Request body larger than the gateway accepts")
    for status, description in _COMMON_ERRORS.items():
        responses.setdefault(str(status), _error(description))
    responses["default"] = _error("Any other error, as a google.rpc.Status")
    for status in RETRY_AFTER_RESPONSES.get(method.full_name, ()):
        responses[str(status)]["headers"] = _header_refs((*COMMON_RESPONSE_HEADERS, "Retry-After"))
    return responses


def _operation(method: RestMethod, contracts: _Contracts, schemas: _SchemaBuilder) -> Schema:
    summary, description = summary_and_description(contracts.comments.get((method.full_name,), ""))
    service = method.service.rsplit(".", 1)[-1]
    operation: Schema = {
        "operationId": f"{service}_{method.method}",
        "tags": [service],
        "summary": summary or method.method,
    }
    if description:
        operation["description"] = description
    parameters = _parameters(method, contracts, schemas)
    parameters.append({"$ref": f"#/components/parameters/{REQUEST_ID_PARAMETER}"})
    if method.full_name in IDEMPOTENT_METHODS:
        parameters.append({"$ref": f"#/components/parameters/{IDEMPOTENCY_KEY_PARAMETER}"})
    operation["parameters"] = parameters
    if method.body == "*":
        schema = schemas.message_schema(
            method.request_type, exclude=method.path_params, request=True
        )
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
    # Every operation says how it is authorised: none, a bearer token, or either.
    if method.public:
        operation["security"] = []
    elif method.optional_token:
        operation["security"] = [{}, {SECURITY_SCHEME: []}]
    else:
        operation["security"] = [{SECURITY_SCHEME: []}]
    body_schema = _success_schema(method, contracts, schemas)
    operation["responses"] = _responses(method, body_schema)
    if method.oauth:
        _oauth_token_operation(operation, contracts, schemas)
    return operation


def openapi_document(
    file_set: descriptor_pb2.FileDescriptorSet, services: Sequence[str] = TRANSCODED_SERVICES
) -> dict[str, Any]:
    """The OpenAPI 3 document for ``services`` of ``file_set`` (a protoc descriptor set, with
    source info for descriptions and ``response_body`` still in the HTTP rules)."""
    contracts = _Contracts(file_set)
    schemas = _SchemaBuilder(contracts)
    paths: dict[str, dict[str, Schema]] = {}
    for method in rest_methods(file_set, services):
        paths.setdefault(method.path, {})[method.http_method.lower()] = _operation(
            method, contracts, schemas
        )
    paths[OPENAPI_REST_PATH] = {
        "get": {
            "operationId": "Gateway_GetOpenApi",
            "tags": ["Gateway"],
            "summary": "This document",
            "description": "The OpenAPI 3 description of the REST API, generated from the "
            "contracts; `GET /docs` renders it as a browsable reference.",
            "security": [],
            "responses": {
                "200": {
                    "description": "OpenAPI 3 description of the REST API",
                    "headers": _header_refs(COMMON_RESPONSE_HEADERS),
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    }
    components = dict(sorted(schemas.components.items()))
    components[STATUS_SCHEMA] = _status_schema()
    components[OAUTH_ERROR_SCHEMA] = _oauth_error_schema()
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": API_TITLE,
            "version": API_VERSION,
            "description": "Generated by cake-codegen from protos/ (do not edit). Errors are "
            "google.rpc.Status objects; 64-bit ids are strings; timestamps are RFC 3339.",
        },
        "servers": [{"url": "/"}],
        # The default; every operation states its own (public ones an empty list).
        "security": [{SECURITY_SCHEME: []}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": components,
            "parameters": _request_parameters(),
            "headers": _response_headers(),
            "securitySchemes": {
                SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "An ES256 access token (15 minutes) from `POST /auth/login` "
                    "or `POST /auth/refresh`, as `Authorization: Bearer <token>`; the keys "
                    "that verify it are published at `GET /.well-known/jwks.json`. The "
                    "gateway checks it, then the services check it again and the caller's "
                    "role (admin-only operations answer 403 to users). A service account's "
                    "token (role `service`, from `POST /oauth/token`) reaches only the "
                    "operations that admit one of its scopes.",
                },
                BASIC_SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "basic",
                    "description": "A service account's client_id and client_secret at "
                    "`POST /oauth/token` (or send them as form parameters instead).",
                },
            },
        },
    }


def render_openapi(file_set: descriptor_pb2.FileDescriptorSet) -> bytes:
    """The document as deterministic JSON text (what ``cake-codegen`` writes)."""
    return (json.dumps(openapi_document(file_set), indent=2, ensure_ascii=False) + "\n").encode()
