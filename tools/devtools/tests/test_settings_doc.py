"""docs/configuration.md lists every setting of every settings class with its real default:
its tables are the generator's output, a new setting changes them, a setting without a
meaning is refused, and the variables the other documents name exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cake_common.settings import ServiceSettings
from cake_devtools import settings_doc
from pydantic import Field
from pydantic_settings import SettingsConfigDict

ROOT = Path(__file__).parents[3]


def test_the_document_is_fresh() -> None:
    current = settings_doc.DOCUMENT.read_text(encoding="utf-8")
    assert settings_doc.rewrite(current) == current, (
        "docs/configuration.md is stale: run `uv run --frozen python -m cake_devtools.settings_doc`"
    )


def test_every_service_has_its_table() -> None:
    services = sorted(p.name for p in (ROOT / "services").iterdir() if (p / "src").is_dir())
    names = {table.name for table in settings_doc.tables()}
    assert set(services) <= names
    document = settings_doc.DOCUMENT.read_text(encoding="utf-8")
    for service in services:
        assert f"<!-- settings:{service}:begin -->" in document


class _Example(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CAKE_EXAMPLE_")

    grpc_port: int = 1
    documented: int = Field(default=3, description="A setting with a description")
    with_docstring: bool = False
    """A setting with a ``docstring``."""


def test_a_new_setting_appears_in_its_table() -> None:
    table = settings_doc.Table(
        "example", "CAKE_EXAMPLE_", _Example, only=frozenset({"documented", "with_docstring"})
    )
    assert settings_doc.render(table).splitlines()[2:] == [
        "| `CAKE_EXAMPLE_DOCUMENTED` | `3` | A setting with a description |",
        "| `CAKE_EXAMPLE_WITH_DOCSTRING` | `false` | A setting with a `docstring`. |",
    ]


class _Undocumented(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CAKE_EXAMPLE_")

    grpc_port: int = 1
    mystery: int = 0


def test_a_setting_without_a_meaning_is_refused() -> None:
    table = settings_doc.Table(
        "example", "CAKE_EXAMPLE_", _Undocumented, only=frozenset({"mystery"})
    )
    with pytest.raises(LookupError, match=r"_Undocumented\.mystery has no meaning"):
        settings_doc.render(table)


def test_a_missing_section_is_an_error() -> None:
    with pytest.raises(LookupError, match="settings:common:begin"):
        settings_doc.rewrite("# Configuration\n")


def test_the_service_variables_the_documents_name_exist() -> None:
    known = {
        f"CAKE_{name.upper()}_{field.upper()}"
        for name, cls in settings_doc._service_settings()
        for field in cls.model_fields
    }
    prefixes = tuple(f"CAKE_{name.upper()}_" for name, _ in settings_doc._service_settings())
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    unknown = {
        f"{document.relative_to(ROOT)}: {variable}"
        for document in documents
        for variable in re.findall(r"\bCAKE_[A-Z0-9_]*[A-Z0-9]", document.read_text())
        if variable.startswith(prefixes) and variable not in known
    }
    assert not unknown, sorted(unknown)
