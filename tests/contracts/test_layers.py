"""The same layers in every service, and their dependencies point inwards.

Every service package has ``domain/``, ``service/`` (with ``ports.py``), ``adapters/`` (with
``tables.py`` and ``unit_of_work.py``), ``entrypoints/`` (with ``cli.py``) and one
``bootstrap.py``. ``domain/`` and ``service/`` are the inside: they import neither the
service's adapters, entry points and composition root, nor the libraries those wrap (gRPC,
SQLAlchemy, the database driver, Redis, Kafka). ``domain/`` does not import ``service/``
either. Read from the source with ``ast`` (``TYPE_CHECKING`` imports count too), so nothing
is imported to check it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = sorted(path.parent.name for path in ROOT.glob("services/*/pyproject.toml"))

#: Libraries only adapters and entry points may use.
OUTSIDE_LIBRARIES = ("grpc", "sqlalchemy", "psycopg", "redis", "aiokafka", "alembic")


def _package(service: str) -> Path:
    return ROOT / "services" / service / "src" / f"cake_{service}"


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """Every module ``path`` imports, absolute (relative imports resolved), with its line."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _dotted(path, node.level)
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:  # `from cake_x import adapters` imports a module too
                yield node.lineno, f"{module}.{alias.name}"


def _dotted(path: Path, level: int) -> str:
    """The package a relative import of ``level`` dots in ``path`` starts from."""
    parts = list(path.parent.parts)
    src = parts.index("src")
    package = parts[src + 1 :]
    return ".".join(package[: len(package) - (level - 1)])


def _forbidden(service: str, layer: str) -> tuple[str, ...]:
    package = f"cake_{service}"
    inside = (
        f"{package}.adapters",
        f"{package}.entrypoints",
        f"{package}.bootstrap",
        *OUTSIDE_LIBRARIES,
    )
    return (*inside, f"{package}.service") if layer == "domain" else inside


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_violations(service: str) -> list[str]:
    package = _package(service)
    found: list[str] = []
    for layer in ("domain", "service"):
        forbidden = _forbidden(service, layer)
        for path in sorted((package / layer).rglob("*.py")):
            for line, module in imported_modules(path):
                if any(_matches(module, prefix) for prefix in forbidden):
                    found.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return sorted(set(found))


@pytest.mark.parametrize("service", SERVICES)
def test_domain_and_service_import_no_adapter_entry_point_or_io_library(service: str) -> None:
    assert layer_violations(service) == []


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_has_the_same_layout(service: str) -> None:
    package = _package(service)
    expected = [
        "domain/__init__.py",
        "service/__init__.py",
        "service/ports.py",
        "adapters/__init__.py",
        "adapters/tables.py",
        "adapters/unit_of_work.py",
        "entrypoints/__init__.py",
        "entrypoints/cli.py",
        "bootstrap.py",
        "settings.py",
    ]
    assert [name for name in expected if not (package / name).is_file()] == []
    # The old places are gone (nothing half-moved).
    stale = ["api", "cli.py", "db.py", "consumer.py", "service/unit_of_work.py"]
    assert [name for name in stale if (package / name).exists()] == []


def test_the_check_catches_a_violation(tmp_path: Path) -> None:
    """The scan sees plain, dotted, ``from`` and relative imports of the outside."""
    service = tmp_path / "src" / "cake_demo" / "service"
    service.mkdir(parents=True)
    module = service / "use_case.py"
    module.write_text(
        "import sqlalchemy.exc\n"
        "from cake_demo.adapters.repository import Repo\n"
        "from cake_demo import entrypoints\n"
        "from ..adapters import tables\n"
        "from cake_demo.domain import rules\n"
    )
    modules = {name for _, name in imported_modules(module)}
    forbidden = _forbidden("demo", "service")
    bad = sorted(m for m in modules if any(_matches(m, p) for p in forbidden))
    assert bad == [
        "cake_demo.adapters",
        "cake_demo.adapters.repository",
        "cake_demo.adapters.repository.Repo",
        "cake_demo.adapters.tables",
        "cake_demo.entrypoints",
        "sqlalchemy.exc",
    ]
