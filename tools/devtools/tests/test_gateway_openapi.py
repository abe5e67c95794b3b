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
from cake_devtools.gateway_config import (
    CREATED_METHODS,
    PUBLIC_METHODS,
    contract_file_set,
    default_openapi_path,
    rest_api,
)
from cake_devtools.openapi import openapi_document
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
        assert ("security" in operation) == (method.full_name not in PUBLIC_METHODS)
        if method.full_name not in PUBLIC_METHODS:
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
        }
    ]
    assert campaign[0]["schema"]["pattern"] == "^-?[0-9]+$"
    assert [(p["name"], p["in"]) for p in dead_letters] == [
        ("pageSize", "query"),
        ("pageToken", "query"),
    ]


def test_descriptions_come_from_the_proto_comments(document: dict[str, Any]) -> None:
    login = document["paths"]["/auth/login"]["post"]

    assert login["summary"].startswith("Login checks an account")
    assert "Invalid credentials" in login["description"]


def test_document_builds_from_descriptors_without_comments() -> None:
    document = openapi_document(contract_file_set())

    assert set(document["paths"]) == {m.path for m in rest_api()} | {"/openapi.json"}
    assert document["paths"]["/auth/login"]["post"]["summary"] == "Login"
