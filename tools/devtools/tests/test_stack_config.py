"""Local stack configuration: profiles and ports, service environment, generated server
configs and SQL. Nothing here starts a server."""

from __future__ import annotations

import base64
import dataclasses
import json
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from cake.events.v1 import registry
from cake_devtools.stack import COMPONENTS, Stack, StackError, credentials, kafka, postgres
from cake_devtools.stack.layout import RunLayout, repo_root
from cake_devtools.stack.redis import redis_command
from cake_devtools.stack.services import (
    SERVICES,
    Endpoints,
    auth_worker_sockets,
    build_service_environment,
)
from cake_devtools.stack.settings import StackSettings, StackSettingsForTests, load_settings
from cake_events.settings import EventsSettings

PORT_FIELDS = [name for name in StackSettings.model_fields if name.endswith("_port")]
DEV_PORTS = {
    "gateway_port": 8080,
    "envoy_admin_port": 19901,
    "pg_port": 15432,
    "redis_port": 16379,
    "kafka_port": 19092,
    "kafka_controller_port": 19093,
    "auth_grpc_port": 17051,
    "promotions_grpc_port": 17052,
    "events_grpc_port": 17053,
    "auth_metrics_port": 19111,
    "promotions_metrics_port": 19112,
    "events_metrics_port": 19113,
    "payments_grpc_port": 17054,
    "payments_metrics_port": 19114,
    "notifications_grpc_port": 17055,
    "notifications_metrics_port": 19115,
    "smtp_sink_port": 11025,
}
TEST_PORTS = {
    "gateway_port": 18080,
    "envoy_admin_port": 19911,
    "pg_port": 15442,
    "redis_port": 16389,
    "kafka_port": 19102,
    "kafka_controller_port": 19103,
    "auth_grpc_port": 17151,
    "promotions_grpc_port": 17152,
    "events_grpc_port": 17153,
    "auth_metrics_port": 19121,
    "promotions_metrics_port": 19122,
    "events_metrics_port": 19123,
    "payments_grpc_port": 17154,
    "payments_metrics_port": 19124,
    "notifications_grpc_port": 17155,
    "notifications_metrics_port": 19125,
    "smtp_sink_port": 11035,
}
DEFAULT_SERVER_PORTS = {80, 443, 5432, 6379, 9092, 9093, 9901, 50051}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The developer's own overrides must not leak into the expected defaults.
    import os

    for name in list(os.environ):
        if name.startswith("CAKE_"):
            monkeypatch.delenv(name)


def _ports(settings: StackSettings) -> dict[str, int]:
    return {name: getattr(settings, name) for name in PORT_FIELDS}


def test_profiles_have_the_agreed_ports() -> None:
    assert _ports(load_settings("dev")) == DEV_PORTS
    assert _ports(load_settings("test")) == TEST_PORTS


def test_profiles_never_share_a_port_nor_use_default_server_ports() -> None:
    dev, test = set(DEV_PORTS.values()), set(TEST_PORTS.values())
    assert len(dev) == len(DEV_PORTS) and len(test) == len(TEST_PORTS)
    assert not dev & test
    assert not (dev | test) & DEFAULT_SERVER_PORTS


def test_each_profile_reads_only_its_own_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAKE_PG_PORT", "15432")
    monkeypatch.setenv("CAKE_TEST_REDIS_PORT", "16389")
    monkeypatch.setenv("CAKE_EXTERNAL_KAFKA_BOOTSTRAP", "kafka.example:9092")

    dev, test = load_settings("dev"), load_settings("test")

    assert (dev.pg_port, dev.redis_port) == (15432, DEV_PORTS["redis_port"])
    assert (test.pg_port, test.redis_port) == (TEST_PORTS["pg_port"], 16389)
    assert dev.external_kafka_bootstrap == "kafka.example:9092"
    assert test.external_kafka_bootstrap is None  # tests never write into dev's servers
    assert isinstance(test, StackSettingsForTests)
    assert dev.postgres_fsync and not test.postgres_fsync


def test_unknown_profile_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown stack profile"):
        load_settings("prod")


def test_run_layout_keeps_profiles_apart_under_dot_run() -> None:
    root = repo_root()
    dev, test = RunLayout(root, "dev"), RunLayout(root, "test")
    assert dev.root == root / ".run" / "dev" and test.root == root / ".run" / "test"
    assert dev.log("kafka") == root / ".run" / "dev" / "logs" / "kafka.log"
    assert dev.kafka_libs("4.1.1") == test.kafka_libs("4.1.1")  # jars are shared
    assert ".run/" in (root / ".gitignore").read_text().splitlines()


def test_unknown_component_names_are_rejected() -> None:
    stack = Stack("test", echo=None)
    with pytest.raises(StackError, match="unknown component"):
        stack.up(["postgres", "mysql"])
    assert COMPONENTS == (
        "postgres",
        "redis",
        "kafka",
        "smtp-sink",
        "auth",
        "payments",
        "promotions",
        "notifications",
        "events",
        "envoy",
    )


# -- service environment ---------------------------------------------------------------------

PASSWORDS = {
    "cake_auth": "pw-auth",
    "cake_promotions": "pw-promotions",
    "cake_events": "pw-events",
    "cake_relay": "pw/relay@x",  # needs URL quoting
    "cake_payments": "pw-payments",
    "cake_notifications": "pw-notifications",
}
ENDPOINTS = Endpoints(
    postgres_host="127.0.0.1",
    postgres_port=15442,
    redis_url="redis://127.0.0.1:16389/0",
    kafka_bootstrap="127.0.0.1:19102",
    grpc_ports={"auth": 17151, "promotions": 17152, "events": 17153, "notifications": 17155},
    jwt_signing_key=Path("/run/keys/jwt-signing-key.pem"),
    jwks_file=Path("/run/keys/jwks.json"),
    metrics_ports={"auth": 19121, "promotions": 19122, "events": 19123, "notifications": 19125},
    smtp_port=11035,
    notifications_secret_file=Path("/run/keys/notifications-client-secret"),
)


def test_service_environment_points_each_service_at_its_own_database() -> None:
    env = build_service_environment(ENDPOINTS, PASSWORDS)

    assert set(env) == {"auth", "promotions", "events", "notifications"}
    assert env["auth"] == {
        "CAKE_AUTH_GRPC_HOST": "127.0.0.1",
        "CAKE_AUTH_GRPC_PORT": "17151",
        "CAKE_AUTH_DATABASE_URL": "postgresql+psycopg://cake_auth:pw-auth@127.0.0.1:15442/cake_auth",
        "CAKE_AUTH_REDIS_URL": "redis://127.0.0.1:16389/0",
        "CAKE_AUTH_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:19102",
        "CAKE_AUTH_LOG_JSON": "true",
        "CAKE_AUTH_JWKS_FILE": "/run/keys/jwks.json",
        "CAKE_AUTH_JWT_PRIVATE_KEY_FILE": "/run/keys/jwt-signing-key.pem",
        "CAKE_AUTH_METRICS_PORT": "19121",
        "CAKE_AUTH_WORKERS": "1",
    }
    assert env["promotions"]["CAKE_PROMOTIONS_DATABASE_URL"].endswith(
        "cake_promotions:pw-promotions@127.0.0.1:15442/cake_promotions"
    )
    assert env["promotions"]["CAKE_PROMOTIONS_GRPC_PORT"] == "17152"
    assert env["promotions"]["CAKE_PROMOTIONS_JWKS_FILE"] == "/run/keys/jwks.json"
    assert "CAKE_PROMOTIONS_JWT_PRIVATE_KEY_FILE" not in env["promotions"]
    assert env["promotions"]["CAKE_PROMOTIONS_METRICS_PORT"] == "19122"
    assert env["events"]["CAKE_EVENTS_METRICS_PORT"] == "19123"


def test_notifications_gets_the_smtp_sink_auth_and_its_service_token() -> None:
    env = build_service_environment(ENDPOINTS, PASSWORDS)["notifications"]
    assert env["CAKE_NOTIFICATIONS_SMTP_HOST"] == "127.0.0.1"
    assert env["CAKE_NOTIFICATIONS_SMTP_PORT"] == "11035"
    assert env["CAKE_NOTIFICATIONS_AUTH_DIRECTORY_TARGET"] == "127.0.0.1:17151"
    assert env["CAKE_NOTIFICATIONS_AUTH_CLIENT_ID"] == "notifications"
    assert (
        env["CAKE_NOTIFICATIONS_AUTH_CLIENT_SECRET_FILE"] == "/run/keys/notifications-client-secret"
    )
    assert env["CAKE_NOTIFICATIONS_DATABASE_URL"].endswith("@127.0.0.1:15442/cake_notifications")


def test_auth_runs_several_workers_with_their_sockets_when_the_stack_says_so() -> None:
    endpoints = replace(ENDPOINTS, auth_workers=2, socket_dir=Path("/run/sockets"))
    auth = build_service_environment(endpoints, PASSWORDS)["auth"]
    assert auth["CAKE_AUTH_WORKERS"] == "2"
    assert auth["CAKE_AUTH_WORKER_SOCKET_DIR"] == "/run/sockets"
    assert auth_worker_sockets(Path("/run/sockets"), 2) == (
        Path("/run/sockets/auth-0.sock"),
        Path("/run/sockets/auth-1.sock"),
    )
    # One worker: the plain single-process server, no sockets (as in Kubernetes).
    single = replace(ENDPOINTS, auth_workers=1, socket_dir=Path("/run/sockets"))
    single_auth = build_service_environment(single, PASSWORDS)["auth"]
    assert single_auth["CAKE_AUTH_WORKERS"] == "1"
    assert "CAKE_AUTH_WORKER_SOCKET_DIR" not in single_auth
    assert auth_worker_sockets(Path("/run/sockets"), 1) == ()


def test_the_bank_simulator_gets_its_own_database_and_promotions_its_address() -> None:
    endpoints = replace(
        ENDPOINTS,
        grpc_ports={**ENDPOINTS.grpc_ports, "payments": 17154},
        metrics_ports={**ENDPOINTS.metrics_ports, "payments": 19124},
    )
    env = build_service_environment(endpoints, {**PASSWORDS, "cake_payments": "pw-bank"})

    assert env["payments"] == {
        "CAKE_PAYMENTS_GRPC_HOST": "127.0.0.1",
        "CAKE_PAYMENTS_GRPC_PORT": "17154",
        "CAKE_PAYMENTS_DATABASE_URL": (
            "postgresql+psycopg://cake_payments:pw-bank@127.0.0.1:15442/cake_payments"
        ),
        "CAKE_PAYMENTS_LOG_JSON": "true",
        "CAKE_PAYMENTS_METRICS_PORT": "19124",
    }
    assert env["promotions"]["CAKE_PROMOTIONS_PAYMENTS_TARGET"] == "127.0.0.1:17154"
    assert (
        "CAKE_PROMOTIONS_PAYMENTS_TARGET"
        not in build_service_environment(ENDPOINTS, PASSWORDS)["promotions"]
    )


def test_tracing_is_off_unless_the_stack_has_an_otlp_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert not any(
        name.endswith("_OTLP_ENDPOINT")
        for env in build_service_environment(ENDPOINTS, PASSWORDS).values()
        for name in env
    )
    monkeypatch.setenv("CAKE_TEST_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    assert load_settings("dev").otlp_endpoint is None
    endpoint = load_settings("test").otlp_endpoint
    assert endpoint == "http://127.0.0.1:4317"

    traced = build_service_environment(
        dataclasses.replace(ENDPOINTS, otlp_endpoint=endpoint), PASSWORDS
    )

    assert traced["auth"]["CAKE_AUTH_OTLP_ENDPOINT"] == endpoint
    assert traced["promotions"]["CAKE_PROMOTIONS_OTLP_ENDPOINT"] == endpoint
    assert traced["events"]["CAKE_EVENTS_OTLP_ENDPOINT"] == endpoint


def test_events_reads_the_outboxes_as_the_relay_role(monkeypatch: pytest.MonkeyPatch) -> None:
    events = build_service_environment(ENDPOINTS, PASSWORDS)["events"]

    relay = "postgresql+psycopg://cake_relay:pw%2Frelay%40x@127.0.0.1:15442"
    assert json.loads(events["CAKE_EVENTS_SOURCES"]) == [
        {
            "name": "auth",
            "outbox_url": f"{relay}/cake_auth",
            "grpc_target": "127.0.0.1:17151",
            "topics": [registry.USER_FIRST_LOGIN.topic],
        },
        {
            "name": "promotions",
            "outbox_url": f"{relay}/cake_promotions",
            "grpc_target": "127.0.0.1:17152",
            "topics": [registry.VOUCHER_ISSUED.topic, registry.PAYMENT_PROCESSED.topic],
        },
    ]
    # What the events service reads from it, through its environment.
    monkeypatch.setenv("CAKE_EVENTS_SOURCES", events["CAKE_EVENTS_SOURCES"])
    settings = EventsSettings(database_url="postgresql+psycopg://u:p@h/db")
    assert [(s.name, s.grpc_target) for s in settings.sources] == [
        ("auth", "127.0.0.1:17151"),
        ("promotions", "127.0.0.1:17152"),
    ]
    assert settings.sources[0].outbox_url.get_secret_value() == f"{relay}/cake_auth"
    assert events["CAKE_EVENTS_DATABASE_URL"].endswith("@127.0.0.1:15442/cake_events")


def test_events_reports_notifications_health_as_not_critical(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GET /health lists notifications (and its database) like the outbox sources; its work
    is asynchronous, so while it is down the report is degraded, not unhealthy."""
    events = build_service_environment(ENDPOINTS, PASSWORDS)["events"]
    monkeypatch.setenv("CAKE_EVENTS_HEALTH_SERVICES", events["CAKE_EVENTS_HEALTH_SERVICES"])
    settings = EventsSettings(database_url="postgresql+psycopg://u:p@h/db")
    assert [(s.name, s.grpc_target, s.critical) for s in settings.health_services] == [
        ("notifications", "127.0.0.1:17155", False)
    ]


def test_external_servers_replace_the_local_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "CAKE_TEST_EXTERNAL_POSTGRES_ADMIN_URL", "postgresql://su:x@db.ci:6543/postgres"
    )
    monkeypatch.setenv("CAKE_TEST_EXTERNAL_REDIS_URL", "redis://cache.ci:6379/3")
    monkeypatch.setenv("CAKE_TEST_EXTERNAL_KAFKA_BOOTSTRAP", "k1.ci:9092,k2.ci:9092")
    stack = Stack("test", echo=None)
    monkeypatch.setattr(type(stack._ctx), "passwords", PASSWORDS | {"postgres": "unused"})

    env = stack.service_environment()["auth"]

    assert env["CAKE_AUTH_DATABASE_URL"].endswith("@db.ci:6543/cake_auth")
    assert env["CAKE_AUTH_REDIS_URL"] == "redis://cache.ci:6379/3"
    assert env["CAKE_AUTH_KAFKA_BOOTSTRAP_SERVERS"] == "k1.ci:9092,k2.ci:9092"
    assert stack.postgres_admin_url == "postgresql://su:x@db.ci:6543/postgres"
    assert stack.kafka_bootstrap == "k1.ci:9092,k2.ci:9092"


# -- generated passwords ---------------------------------------------------------------------


def test_passwords_are_generated_once_and_kept_private(tmp_path: Path) -> None:
    path = tmp_path / "run" / "secrets.json"

    first = credentials.load_or_create(path, ["a", "b"])
    again = credentials.load_or_create(path, ["a", "b", "c"])

    assert first["a"] != first["b"] and len(first["a"]) >= 32
    assert {k: again[k] for k in ("a", "b")} == first  # stored ones are reused
    assert "c" in again
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert credentials.redact(f"url://u:{first['a']}@h", first.values()) == "url://u:***@h"


# -- PostgreSQL ------------------------------------------------------------------------------


def _sql(statement: object) -> str:
    return statement.as_string(None)  # type: ignore[attr-defined,no-any-return]


def test_pg_hba_allows_only_password_logins() -> None:
    rules = [
        line.split()
        for line in postgres.pg_hba_conf().splitlines()
        if line and not line.startswith("#")
    ]
    assert rules == [
        ["local", "all", "all", "scram-sha-256"],
        ["host", "all", "all", "127.0.0.1/32", "scram-sha-256"],
    ]


def test_server_conf_listens_on_loopback_and_skips_fsync_only_when_asked(tmp_path: Path) -> None:
    durable = postgres.server_conf(port=15442, socket_dir=tmp_path, fsync=True)
    fast = postgres.server_conf(port=15442, socket_dir=None, fsync=False)

    assert "listen_addresses = '127.0.0.1'" in durable
    assert "port = 15442" in durable
    assert f"unix_socket_directories = '{tmp_path}'" in durable
    assert "fsync" not in durable
    assert "fsync = off" in fast and "unix_socket_directories = ''" in fast


def test_roles_are_created_idempotently_without_privileges() -> None:
    create, alter = (_sql(s) for s in postgres.role_statements("cake_relay", "p'w"))

    assert "IF NOT EXISTS" in create and 'CREATE ROLE "cake_relay"' in create
    assert alter.startswith('ALTER ROLE "cake_relay" WITH LOGIN NOSUPERUSER NOCREATEDB')
    assert "NOCREATEROLE" in alter and "NOBYPASSRLS" in alter
    assert alter.endswith("PASSWORD 'p''w'")  # quoted as a literal


def test_each_service_owns_its_database_and_the_relay_only_connects() -> None:
    by_name = {db.name: db for db in postgres.DATABASES}
    assert {name: db.owner for name, db in by_name.items()} == {
        "cake_auth": "cake_auth",
        "cake_promotions": "cake_promotions",
        "cake_events": "cake_events",
        "cake_payments": "cake_payments",
        "cake_notifications": "cake_notifications",
    }

    auth = [_sql(s) for s in postgres.database_privilege_statements(by_name["cake_auth"])]
    events = [_sql(s) for s in postgres.database_privilege_statements(by_name["cake_events"])]

    assert _sql(postgres.create_database_statement(by_name["cake_auth"])) == (
        'CREATE DATABASE "cake_auth" OWNER "cake_auth" ENCODING \'UTF8\' TEMPLATE template0'
    )
    assert auth == [
        'ALTER DATABASE "cake_auth" OWNER TO "cake_auth"',
        'REVOKE CONNECT, TEMPORARY ON DATABASE "cake_auth" FROM PUBLIC',
        'GRANT CONNECT ON DATABASE "cake_auth" TO "cake_relay"',
    ]
    assert not any("cake_relay" in statement for statement in events)
    assert postgres.ROLES == (
        "cake_auth",
        "cake_promotions",
        "cake_events",
        "cake_payments",
        "cake_notifications",
        "cake_relay",
    )


def test_admin_url_is_a_superuser_libpq_url() -> None:
    assert postgres.admin_url(password="a/b", port=15442) == (
        "postgresql://postgres:a%2Fb@127.0.0.1:15442/postgres"
    )


# -- Redis and Kafka -------------------------------------------------------------------------


def test_redis_runs_in_the_foreground_on_loopback_without_persistence() -> None:
    argv = redis_command("/usr/bin/redis-server", port=16389, data_dir="/run/redis")

    options = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert options == {
        "--port": "16389",
        "--bind": "127.0.0.1",
        "--dir": "/run/redis",
        "--save": "",
        "--appendonly": "no",
        "--daemonize": "no",
        "--logfile": "",
    }


def test_kafka_server_properties_single_kraft_node(tmp_path: Path) -> None:
    text = kafka.server_properties(port=19102, controller_port=19103, data_dir=tmp_path)
    props = dict(
        line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")
    )

    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19103"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19102,CONTROLLER://127.0.0.1:19103"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19102"
    assert props["log.dirs"] == str(tmp_path)
    assert props["num.partitions"] == "6"
    assert props["auto.create.topics.enable"] == "false"
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "min.insync.replicas",
    ):
        assert props[key] == "1"


def test_kafka_topics_and_their_dead_letter_topics() -> None:
    assert kafka.topic_names() == [
        "cake.auth.user.v1",
        "cake.auth.user.v1.dlq",
        "cake.promotions.voucher.v1",
        "cake.promotions.voucher.v1.dlq",
        "cake.promotions.payment.v1",
        "cake.promotions.payment.v1.dlq",
    ]
    assert kafka.PARTITIONS == 6


def test_kafka_version_comes_from_the_pom() -> None:
    version = kafka.kafka_version(RunLayout(repo_root(), "test").kafka_pom)
    major, *_ = version.split(".")
    assert major == "4"


def test_cluster_id_is_kafka_uuid_format() -> None:
    cluster_id = kafka.new_cluster_id()
    assert len(cluster_id) == 22
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16
    assert kafka.new_cluster_id() != cluster_id


def test_cli_accepts_options_between_command_and_components() -> None:
    from cake_devtools.stack import cli

    args = cli._parser().parse_intermixed_args(["up", "--profile", "test", "postgres", "redis"])
    assert (args.command, args.profile, args.components) == ("up", "test", ["postgres", "redis"])
    assert cli._parser().parse_intermixed_args(["status"]).profile == "dev"


def test_every_gateway_probe_is_a_public_get_route_of_the_contracts() -> None:
    """A service's ``gateway_probe`` must answer 200 without a token through the gateway:
    a GET path of the generated OpenAPI document with no security requirement."""
    paths = json.loads((repo_root() / "gateway" / "generated" / "openapi.json").read_text())[
        "paths"
    ]
    probes = {spec.name: spec.gateway_probe for spec in SERVICES if spec.gateway_probe}
    assert probes == {"auth": "/.well-known/jwks.json"}
    for probe in probes.values():
        assert paths[probe]["get"].get("security") == [], probe
