"""House rule: importing cake_common configures nothing and starts nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

#: Fresh Python interpreters: `make test` runs it, the quick `make test-unit` does not.
pytestmark = pytest.mark.slow

MODULES = [
    "cake_common.auth_context",
    "cake_common.db",
    "cake_common.errors",
    "cake_common.grpc_server",
    "cake_common.inbox",
    "cake_common.jwt",
    "cake_common.kafka",
    "cake_common.logging",
    "cake_common.migrations",
    "cake_common.outbox",
    "cake_common.redis",
    "cake_common.settings",
    "cake_common.startup_retry",
    "cake_common.validation",
]

CHECK = f"""
import logging, sys, threading
import structlog

for name in {MODULES!r}:
    __import__(name)
problems = []
if logging.getLogger().handlers:
    problems.append("root logging handlers installed")
if structlog.is_configured():
    problems.append("structlog configured")
if "protovalidate" in sys.modules:
    problems.append("protovalidate imported (it builds a validator at import)")
if threading.active_count() != 1:
    problems.append(f"threads started: {{threading.enumerate()}}")
print("; ".join(problems))
sys.exit(1 if problems else 0)
"""


def test_importing_every_module_has_no_side_effects() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
