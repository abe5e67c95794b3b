"""The settings tables of ``docs/configuration.md``, generated from the pydantic-settings classes.

Every ``CAKE_*`` variable a service, the local stack or its gateway reads is a field of one
settings class; this renders one table per class (variable, default, meaning) between the
``<!-- settings:NAME:begin/end -->`` markers of the document, so the reference cannot drift
from the code. A field's meaning is its ``Field(description=...)``, else the docstring under
it, else an entry of ``_MEANINGS`` below (for the plain fields whose name says most of it);
a field with none of them is an error, so a new setting cannot go undocumented.

    uv run --frozen python -m cake_devtools.settings_doc           # rewrite the tables
    uv run --frozen python -m cake_devtools.settings_doc --check   # fail if they are stale

Services are found by directory (``services/<name>/src/cake_<name>/settings.py``, the
``ServiceSettings`` subclass in it), so a new service gets its table on the next run.
"""

from __future__ import annotations

import argparse
import ast
import decimal
import importlib
import inspect
import itertools
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parents[4]
DOCUMENT = ROOT / "docs" / "configuration.md"

#: Meanings of the fields whose class gives none (kept short; the class wins when it has one).
_MEANINGS: dict[str, str] = {
    "ServiceSettings.grpc_host": "Address the gRPC server binds (0.0.0.0 in a container)",
    "ServiceSettings.database_pool_size": "Connections kept in the pool of the own database",
    "ServiceSettings.redis_url": "Redis (cache, login throttling, revocations); optional at "
    "run time: what needs it degrades, logged and counted",
    "ServiceSettings.kafka_bootstrap_servers": "Kafka brokers, comma-separated host:port",
    "ServiceSettings.log_level": "Log level (DEBUG, INFO, WARNING, ERROR)",
    "ServiceSettings.log_json": "JSON lines on stdout (false: readable console lines)",
    "ServiceSettings.shutdown_grace_seconds": "On SIGTERM: health NOT_SERVING, then this long "
    "for the calls in flight to finish",
    "ServiceSettings.jwt_issuer": "`iss` every access token must carry",
    "ServiceSettings.jwt_audience": "`aud` every access token must carry",
    "ServiceSettings.jwks_file": "JWK Set of the public keys that verify access tokens "
    "(re-read when it changes)",
    "ServiceSettings.metrics_port": "Port of the Prometheus `/metrics` endpoint (unset: none)",
    "ServiceSettings.grpc_port": "gRPC port",
    "PromotionsSettings.consumer_group": "Kafka consumer group of the first-login consumer",
    "EventsSettings.auth_grpc_target": "auth's gRPC address, probed for GET /health",
    "EventsSettings.promotions_grpc_target": "promotions' gRPC address, probed for GET /health",
    "EventsSettings.health_probe_timeout_seconds": "Timeout of each component probe of GET /health",
    "StackSettings.gateway_port": "Envoy's listener (REST and gRPC)",
    "StackSettings.envoy_admin_port": "Envoy's admin interface (127.0.0.1 only)",
    "StackSettings.pg_port": "PostgreSQL 15",
    "StackSettings.redis_port": "Redis",
    "StackSettings.kafka_port": "Kafka broker (KRaft)",
    "StackSettings.kafka_controller_port": "Kafka controller (KRaft)",
    "StackSettings.auth_grpc_port": "auth gRPC",
    "StackSettings.promotions_grpc_port": "promotions gRPC",
    "StackSettings.events_grpc_port": "events gRPC",
    "StackSettings.payments_grpc_port": "payments (bank simulator) gRPC",
    "StackSettings.notifications_grpc_port": "notifications gRPC",
    "StackSettings.smtp_sink_port": "the SMTP sink (e-mails as files in `.run/<profile>/mail/`)",
    "StackSettings.auth_metrics_port": "auth `/metrics`",
    "StackSettings.promotions_metrics_port": "promotions `/metrics`",
    "StackSettings.events_metrics_port": "events `/metrics`",
    "StackSettings.payments_metrics_port": "payments `/metrics`",
    "StackSettings.notifications_metrics_port": "notifications `/metrics`",
    "StackSettings.external_redis_url": "Use this Redis instead of starting one",
    "StackSettings.external_kafka_bootstrap": "Use these Kafka brokers instead of starting one "
    "(the stack creates the topics there)",
    "StackSettings.kafka_heap": "JVM heap of the local broker (-Xmx/-Xms)",
    "StackSettings.postgres_fsync": "PostgreSQL `fsync` (off only for throw-away test data)",
    "GatewaySettings.max_downstream_connections": "Connections Envoy accepts at once",
    "GatewaySettings.request_timeout_seconds": "Whole-request timeout at the edge (504 after)",
    "GatewaySettings.upstream_timeout_seconds": "Timeout of the call to a service (504 after)",
    "GatewaySettings.xff_num_trusted_hops": "Proxies in front of Envoy whose X-Forwarded-For "
    "is trusted for the client IP (rate limits)",
}


@dataclass(frozen=True)
class Table:
    """One settings table: a marker name, the variables' prefix and the classes behind it."""

    name: str
    prefix: str
    settings: type[BaseSettings]
    #: Only these fields (``None``: all but ``skip``).
    only: frozenset[str] | None = None
    skip: frozenset[str] = frozenset()
    #: A second class whose defaults make a second column (the test profile).
    second: type[BaseSettings] | None = None
    second_heading: str = ""


def _attribute_docstrings(cls: type) -> dict[str, str]:
    """The string literal under each annotated field of ``cls``'s own body."""
    try:
        tree = ast.parse(inspect.getsource(cls).strip())
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if isinstance(tree.body[0], ast.ClassDef) else []
    found: dict[str, str] = {}
    for current, following in itertools.pairwise(body):
        if (
            isinstance(current, ast.AnnAssign)
            and isinstance(current.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            found[current.target.id] = " ".join(following.value.value.split())
    return found


def _owner(cls: type[BaseSettings], field: str) -> type:
    for klass in cls.__mro__:
        if field in getattr(klass, "__annotations__", {}):
            return klass
    return cls


def meaning(cls: type[BaseSettings], field: str) -> str:
    info = cls.model_fields[field]
    if info.description:
        return " ".join(info.description.split())
    for klass in cls.__mro__:
        if field not in getattr(klass, "__annotations__", {}):
            continue
        docstring = _attribute_docstrings(klass).get(field)
        if docstring:
            return docstring.replace("``", "`")
        explained = _MEANINGS.get(f"{klass.__name__}.{field}")
        if explained:
            return explained
    raise LookupError(
        f"{cls.__name__}.{field} has no meaning: give it a Field(description=...) or a "
        f"docstring (or an entry in cake_devtools.settings_doc._MEANINGS)"
    )


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        return "computed"
    value: Any = info.default
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (dict, list)):
        value = json.dumps(value)
    if isinstance(value, decimal.Decimal):
        value = str(value)
    text = str(value)
    return f"`{text}`" if text else '`""`'


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(table: Table) -> str:
    names = [
        name
        for name in table.settings.model_fields
        if name not in table.skip and (table.only is None or name in table.only)
    ]
    heading = "| variable | default |"
    rule = "|---|---|"
    if table.second is not None:
        heading += f" {table.second_heading} |"
        rule += "---|"
    lines = [heading + " meaning |", rule + "---|"]
    for name in names:
        row = f"| `{table.prefix}{name.upper()}` | {_default(table.settings.model_fields[name])} |"
        if table.second is not None:
            row += f" {_default(table.second.model_fields[name])} |"
        lines.append(row + f" {_cell(meaning(table.settings, name))} |")
    return "\n".join(lines)


def _service_settings() -> Iterator[tuple[str, type[BaseSettings]]]:
    from cake_common.settings import ServiceSettings

    for directory in sorted((ROOT / "services").iterdir()):
        source = directory / "src" / f"cake_{directory.name}" / "settings.py"
        if not source.is_file():
            continue
        module = importlib.import_module(f"cake_{directory.name}.settings")
        (cls,) = [
            value
            for value in vars(module).values()
            if isinstance(value, type)
            and issubclass(value, ServiceSettings)
            and value is not ServiceSettings
            and value.__module__ == module.__name__
        ]
        yield directory.name, cls


def tables() -> list[Table]:
    from cake_common.settings import ServiceSettings

    from cake_devtools.stack.envoy import GatewaySettings, GatewaySettingsForTests
    from cake_devtools.stack.settings import StackSettings, StackSettingsForTests

    common = frozenset(ServiceSettings.model_fields) - {"service_name", "grpc_port"}
    found = [
        Table("common", "CAKE_<SVC>_", ServiceSettings, skip=frozenset({"service_name"})),
    ]
    for name, cls in _service_settings():
        own = frozenset(cls.model_fields) - common - {"service_name"}
        found.append(Table(name, f"CAKE_{name.upper()}_", cls, only=own))
    found.append(
        Table(
            "stack",
            "CAKE_",
            StackSettings,
            second=StackSettingsForTests,
            second_heading="test profile (`CAKE_TEST_…`)",
        )
    )
    found.append(
        Table(
            "gateway",
            "CAKE_GATEWAY_",
            GatewaySettings,
            second=GatewaySettingsForTests,
            second_heading="test profile (`CAKE_TEST_GATEWAY_…`)",
        )
    )
    return found


def _marker(name: str, end: str) -> str:
    return f"<!-- settings:{name}:{end} -->"


def rewrite(document: str) -> str:
    """``document`` with every table between its markers re-rendered; every table has a place."""
    for table in tables():
        begin, end = _marker(table.name, "begin"), _marker(table.name, "end")
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), flags=re.DOTALL)
        if not pattern.search(document):
            raise LookupError(
                f"{DOCUMENT.relative_to(ROOT)} has no {begin} … {end} section for the "
                f"{table.name} settings: add one"
            )
        # A function as replacement: the rendered text is taken literally (no group escapes).
        rendered = f"{begin}\n{render(table)}\n{end}"

        def replacement(_: re.Match[str], text: str = rendered) -> str:
            return text

        document = pattern.sub(replacement, document)
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if the tables are stale")
    args = parser.parse_args(argv)
    current = DOCUMENT.read_text(encoding="utf-8")
    try:
        fresh = rewrite(current)
    except LookupError as error:
        print(f"settings_doc: {error}", file=sys.stderr)
        return 1
    if args.check:
        if fresh != current:
            print(
                f"{DOCUMENT.relative_to(ROOT)} is stale: run "
                "`uv run --frozen python -m cake_devtools.settings_doc`",
                file=sys.stderr,
            )
            return 1
        return 0
    if fresh != current:
        DOCUMENT.write_text(fresh, encoding="utf-8")
        print(f"settings_doc: rewrote the tables of {DOCUMENT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
