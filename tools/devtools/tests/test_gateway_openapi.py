"""The OpenAPI document generated from the contracts (``gateway/generated/openapi.json``).

Freshness is checked with the other generated files (``cake-codegen --check`` in
``test_codegen.py``); here: that it is a usable OpenAPI 3 document and says what the gateway
really does (routes, statuses, bare bodies, auth, JSON mapping, validation rules).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import schemathesis
from cake_common.grpc_server.interceptors import (
    _ACCEPTABLE_REQUEST_ID,
    REQUEST_ID_METADATA_KEY,
)
from cake_common.grpc_server.rich_status import RETRY_AFTER_METADATA_KEY
from cake_devtools.gateway_config import (
    CREATED_METHODS,
    contract_file_set,
    default_descriptor_path,
    default_openapi_path,
    rest_api,
)
from cake_devtools.openapi import openapi_document, summary_and_description
from cake_promotions.domain.topups import MAX_IDEMPOTENCY_KEY_LENGTH
from cake_promotions.service.topups import IDEMPOTENCY_KEY_FIELD, IDEMPOTENT_REPLAYED_HEADER
from google.protobuf import descriptor_pb2
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from schemathesis.core.result import Ok


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return json.loads(default_openapi_path().read_text())  # type: ignore[no-any-return]


def _resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _success(document: dict[str, Any], path: str, verb: str) -> tuple[str, dict[str, Any]]:
    responses = document["paths"][path][verb]["responses"]
    status = next(code for code in responses if code.startswith("2"))
    return status, responses[status]["content"]["application/json"]["schema"]


def test_schemathesis_loads_every_operation(document: dict[str, Any]) -> None:
    schema = schemathesis.openapi.from_dict(document)
    results = list(schema.get_all_operations())

    assert all(isinstance(result, Ok) for result in results), results
    assert len(results) == len(rest_api()) + 1  # and GET /openapi.json itself


def test_every_ref_resolves(document: dict[str, Any]) -> None:
    text = json.dumps(document)
    names = set(document["components"]["schemas"])
    for piece in text.split('"$ref": "#/components/schemas/')[1:]:
        assert piece.split('"', 1)[0] in names


def test_every_rest_method_is_documented_with_its_status_and_auth(
    document: dict[str, Any],
) -> None:
    for method in rest_api():
        operation = document["paths"][method.path][method.http_method.lower()]
        status, _ = _success(document, method.path, method.http_method.lower())
        assert status == ("201" if method.full_name in CREATED_METHODS else "200")
        if method.oauth:
            # RFC 6749: the client authenticates by HTTP Basic or by form parameters.
            assert operation["security"] == [{}, {"clientBasic": []}]
            body = operation["requestBody"]["content"]["application/x-www-form-urlencoded"]
            assert set(body["schema"]["properties"]) == {
                "grant_type",
                "client_id",
                "client_secret",
                "scope",
            }
            for status in ("400", "401"):
                schema = operation["responses"][status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/OAuthError"}
        elif method.public:
            assert operation["security"] == []
        elif method.optional_token:
            assert operation["security"] == [{}, {"bearerAuth": []}]
        else:
            assert operation["security"] == [{"bearerAuth": []}]
        if not method.public:
            assert "401" in operation["responses"]
        assert operation["summary"]
        assert "429" in operation["responses"]


def test_wrapped_responses_are_documented_bare(document: dict[str, Any]) -> None:
    _, campaigns = _success(document, "/promotions/campaigns", "get")
    _, profile = _success(document, "/auth/profile", "get")
    _, login = _success(document, "/auth/login", "post")

    assert campaigns["type"] == "array"
    assert campaigns["items"]["$ref"].endswith("cake.promotions.v1.Campaign")
    assert "fullname" in _resolve(document, profile)["properties"]
    assert set(_resolve(document, login)["properties"]) == {
        "access_token",
        "user",
        "refresh_token",
        "expires_in",
    }


def test_json_mapping_and_printed_defaults(document: dict[str, Any]) -> None:
    campaign = document["components"]["schemas"]["cake.promotions.v1.Campaign"]
    voucher = document["components"]["schemas"]["cake.promotions.v1.Voucher"]

    assert campaign["properties"]["id"]["type"] == "string"  # int64
    assert campaign["properties"]["startDate"]["format"] == "date-time"
    assert campaign["properties"]["discountPercentage"]["type"] == "number"
    # Printed even when false / 0: always present.
    assert {"isValid", "isExpired", "status"} <= set(voucher["required"])
    # Optional fields are absent while unset.
    assert "usedAmount" not in voucher["required"]


def test_request_bodies_carry_the_validation_rules_and_reject_unknown_fields(
    document: dict[str, Any],
) -> None:
    register = document["paths"]["/auth/register"]["post"]["requestBody"]["content"]
    schema = register["application/json"]["schema"]
    campaign = document["paths"]["/promotions/campaigns"]["post"]["requestBody"]["content"]
    campaign_schema = campaign["application/json"]["schema"]

    assert schema["additionalProperties"] is False
    assert schema["properties"]["username"]["pattern"] == "^[A-Za-z0-9_]{3,50}$"
    assert schema["properties"]["password"]["minLength"] == 6
    assert schema["properties"]["email"]["format"] == "email"
    assert {"startDate", "endDate"} <= set(campaign_schema["required"])
    assert campaign_schema["properties"]["maxParticipants"]["maximum"] == 1000000


def test_path_and_query_parameters(document: dict[str, Any]) -> None:
    campaign = document["paths"]["/promotions/campaigns/{id}"]["get"]["parameters"]
    dead_letters = document["paths"]["/admin/events/dead-letters"]["get"]["parameters"]

    assert campaign == [
        {
            "name": "id",
            "in": "path",
            "required": True,
            "schema": campaign[0]["schema"],
        },
        {"$ref": "#/components/parameters/RequestId"},
    ]
    assert campaign[0]["schema"]["pattern"] == "^-?[0-9]+$"
    assert [(p["name"], p["in"]) for p in dead_letters[:-1]] == [
        ("pageSize", "query"),
        ("pageToken", "query"),
    ]


def test_descriptions_come_from_the_proto_comments(document: dict[str, Any]) -> None:
    login = document["paths"]["/auth/login"]["post"]

    assert login["summary"] == (
        "Login checks an account (username, e-mail or phone number) and password and returns "
        "an access token."
    )
    assert login["description"].startswith(login["summary"] + " The first successful login")
    assert "Invalid credentials" in login["description"]


def test_summaries_are_whole_sentences_and_descriptions_whole_comments(
    document: dict[str, Any],
) -> None:
    # The gateway's descriptor set keeps protoc's source info (comments).
    file_set = descriptor_pb2.FileDescriptorSet.FromString(default_descriptor_path().read_bytes())
    comments = {
        f"{file.package}.{service.name}/{service.method[path[3]].name}": location.leading_comments
        for file in file_set.file
        for service_index, service in enumerate(file.service)
        for location in file.source_code_info.location
        if len(path := tuple(location.path)) == 4
        and path[:3] == (6, service_index, 2)
        and location.leading_comments.strip()
    }
    for method in rest_api():
        operation = document["paths"][method.path][method.http_method.lower()]
        words = comments[method.full_name].split()
        assert operation["description"].split() == words, method.full_name
        assert operation["summary"].endswith((".", ")", "!", "?")), operation["summary"]
        assert operation["description"].startswith(operation["summary"])


@pytest.mark.parametrize(
    ("comment", "summary", "description"),
    [
        ("One line.", "One line.", "One line."),
        ("Cut here. Not\nthis.", "Cut here.", "Cut here. Not this."),
        (
            "Goes on, e.g. past this. Then\n\nnew paragraph.",
            "Goes on, e.g. past this.",
            "Goes on, e.g. past this. Then\n\nnew paragraph.",
        ),
        ("No full stop", "No full stop", "No full stop"),
        ("", "", ""),
    ],
)
def test_summary_is_the_first_sentence(comment: str, summary: str, description: str) -> None:
    assert summary_and_description(comment) == (summary, description)


def test_document_passes_openapi_spec_validator(document: dict[str, Any]) -> None:
    validate(document)  # raises OpenAPIValidationError naming the first problem


def test_spec_validator_rejects_a_broken_document(document: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(document))
    del broken["paths"]["/auth/login"]["post"]["responses"]["200"]["description"]
    with pytest.raises(OpenAPIValidationError):
        validate(broken)


def _header_names(response: dict[str, Any]) -> set[str]:
    return {name.lower() for name in response.get("headers", {})}


def test_headers_are_declared_where_they_apply(document: dict[str, Any]) -> None:
    topup = document["paths"]["/promotions/topup"]["post"]
    login = document["paths"]["/auth/login"]["post"]
    common = {"x-request-id", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"}

    for path, item in document["paths"].items():
        for verb, operation in item.items():
            for status, response in operation["responses"].items():
                assert common <= _header_names(response), (path, verb, status)
            if path != "/openapi.json":
                refs = [p.get("$ref") for p in operation["parameters"]]
                assert "#/components/parameters/RequestId" in refs, (path, verb)
    topup_refs = [p.get("$ref") for p in topup["parameters"]]
    assert "#/components/parameters/IdempotencyKey" in topup_refs
    assert "idempotent-replayed" in _header_names(topup["responses"]["200"])
    assert "retry-after" in _header_names(topup["responses"]["409"])
    assert "retry-after" in _header_names(topup["responses"]["503"])
    assert "retry-after" in _header_names(login["responses"]["429"])
    assert "retry-after" not in _header_names(login["responses"]["200"])
    others = [
        op for path, item in document["paths"].items() for op in item.values() if op is not topup
    ]
    for operation in others:
        refs = [p.get("$ref") for p in operation.get("parameters", [])]
        assert "#/components/parameters/IdempotencyKey" not in refs
        assert "idempotent-replayed" not in _header_names(operation["responses"].get("200", {}))


def test_declared_headers_are_the_ones_the_services_use(document: dict[str, Any]) -> None:
    parameters = document["components"]["parameters"]
    headers = {name.lower() for name in document["components"]["headers"]}

    assert parameters["IdempotencyKey"]["name"].lower() == IDEMPOTENCY_KEY_FIELD
    assert parameters["IdempotencyKey"]["schema"]["maxLength"] == MAX_IDEMPOTENCY_KEY_LENGTH
    assert IDEMPOTENT_REPLAYED_HEADER in headers
    assert RETRY_AFTER_METADATA_KEY in headers
    assert parameters["RequestId"]["name"] == REQUEST_ID_METADATA_KEY
    assert parameters["RequestId"]["schema"]["pattern"] == f"^{_ACCEPTABLE_REQUEST_ID.pattern}$"


def test_security_scheme_is_a_bearer_jwt(document: dict[str, Any]) -> None:
    scheme = document["components"]["securitySchemes"]["bearerAuth"]

    assert (scheme["type"], scheme["scheme"], scheme["bearerFormat"]) == ("http", "bearer", "JWT")
    assert document["security"] == [{"bearerAuth": []}]


def test_document_builds_from_descriptors_without_comments() -> None:
    document = openapi_document(contract_file_set())

    assert set(document["paths"]) == {m.path for m in rest_api()} | {"/openapi.json"}
    assert document["paths"]["/auth/login"]["post"]["summary"] == "Login"
