"""schemathesis against ``GET /openapi.json`` of the gateway, with a valid user token: no input
the document allows, nor the nearly-valid inputs of its negative mode, may cause a 5xx.

The document is fetched from the gateway when the test runs (schemathesis' own pytest fixture
loader does not work with pytest 9, so each operation runs through its Hypothesis strategy
here). Bounded so CI stays quick: ``CAKE_SCHEMATHESIS_MAX_EXAMPLES`` examples per operation and
mode (default 10); the benchmark suite runs it with a larger number. Logout is left out (it
would revoke the token the other operations use). Campaign writes are admin-only, so this
user's fuzzing leaves no campaigns behind to enroll other tests' users.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import httpx
import pytest
import schemathesis
from cake_devtools.gateway_config import default_openapi_path, rest_api
from cake_devtools.stack import Stack
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = int(os.environ.get("CAKE_SCHEMATHESIS_MAX_EXAMPLES", "10"))
EXCLUDED = {"POST /auth/logout"}


def _operations() -> list[tuple[GenerationMode, str]]:
    """(mode, label) pairs; negative cases only where there is input to get wrong."""
    pairs = []
    for method in rest_api():
        label = f"{method.http_method} {method.path}"
        if label in EXCLUDED:
            continue
        pairs.append((GenerationMode.POSITIVE, label))
        has_input = method.body or method.path_params or _has_query(method.path, method.http_method)
        if has_input:
            pairs.append((GenerationMode.NEGATIVE, label))
    return pairs


def _has_query(path: str, verb: str) -> bool:
    document = json.loads(default_openapi_path().read_text())
    return bool(document["paths"][path][verb.lower()].get("parameters"))


@pytest.fixture(scope="module")
def api_schema(full_stack: Stack) -> Any:
    served = httpx.get(f"{full_stack.gateway_url}/openapi.json", timeout=30)
    # What is fuzzed is what clients get, and that is the generated document.
    assert served.content == default_openapi_path().read_bytes()
    schema = schemathesis.openapi.from_url(f"{full_stack.gateway_url}/openapi.json")
    schema.config.update(base_url=full_stack.gateway_url, request_timeout=30)
    return schema


@pytest.fixture(scope="module")
def bearer(full_stack: Stack) -> str:
    username = f"fuzz_{uuid.uuid4().hex[:10]}"
    response = httpx.post(
        f"{full_stack.gateway_url}/auth/register",
        json={
            "fullname": "Fuzz Tester",
            "email": f"{username}@example.com",
            "username": username,
            "phone": "+849" + str(uuid.uuid4().int)[:9],
            "password": "fuzz-pass-1",
            "birthday": "1991-02-03",
        },
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["access_token"])


@pytest.mark.parametrize(("mode", "label"), _operations(), ids=lambda v: getattr(v, "value", v))
def test_no_input_makes_the_api_answer_5xx(
    api_schema: Any, bearer: str, mode: GenerationMode, label: str
) -> None:
    operation = next(
        result.ok() for result in api_schema.get_all_operations() if result.ok().label == label
    )
    headers = {"authorization": f"Bearer {bearer}"}

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        case.call_and_validate(headers=headers, checks=[not_a_server_error])

    run()
