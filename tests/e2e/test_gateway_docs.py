"""The gateway's API reference page, ``GET /docs``, as a person sees it: the stack's Envoy
serves Swagger UI (from the pinned ``swagger-ui-py`` wheel, no CDN) under its own
Content-Security-Policy, and headless Chromium (Debian's ``chromium``, installed by
``tools/bootstrap.sh --tests``) renders it from ``/openapi.json`` with every operation of the
document listed and no resource refused by the policy.

``CAKE_UPDATE_SCREENSHOTS=1`` also writes the page's screenshot to ``docs/img/api-docs.png``
(docs/api.md shows it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from cake_devtools.gateway_config import (
    DOCS_CONTENT_SECURITY_POLICY,
    DOCS_REST_PATH,
    default_docs_pages_dir,
    default_openapi_path,
    default_swagger_ui_dir,
    docs_files,
)
from cake_devtools.stack import Stack

pytestmark = pytest.mark.e2e

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "api-docs.png"
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium")
    assert binary, "chromium is missing: run `bash tools/bootstrap.sh --tests` (apt: chromium)"
    # Root (CI, containers) cannot use Chromium's user-namespace sandbox.
    sandbox = ["--no-sandbox"] if os.geteuid() == 0 else []
    return subprocess.run(
        [
            binary,
            "--headless",
            "--disable-gpu",
            *sandbox,
            "--hide-scrollbars",
            # Console messages (CSP refusals among them) go to stderr as INFO:CONSOLE lines.
            "--enable-logging=stderr",
            "--v=0",
            # Run the page's scripts until it is idle (or this much virtual time passed).
            "--virtual-time-budget=20000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )


class _Operations(HTMLParser):
    """(METHOD, path) of every operation block Swagger UI rendered."""

    def __init__(self) -> None:
        super().__init__()
        self.operations: set[tuple[str, str]] = set()
        self._method: str | None = None
        self._in_method = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = (dict(attrs).get("class") or "").split()
        if "opblock-summary-method" in classes:
            self._in_method = True
        elif "opblock-summary-path" in classes and self._method is not None:
            path = dict(attrs).get("data-path")
            assert path, attrs
            self.operations.add((self._method, path))
            self._method = None

    def handle_data(self, data: str) -> None:
        if self._in_method and data.strip():
            self._method = data.strip().upper()
            self._in_method = False


def document_operations() -> set[tuple[str, str]]:
    paths = json.loads(default_openapi_path().read_text())["paths"]
    return {
        (method.upper(), path)
        for path, item in paths.items()
        for method in item
        if method in HTTP_METHODS
    }


def test_docs_files_are_served_with_the_page_policy(full_stack: Stack) -> None:
    files = docs_files(default_docs_pages_dir(), default_swagger_ui_dir())
    with httpx.Client(base_url=full_stack.gateway_url, timeout=30) as http:
        for docs_file in files:
            response = http.get(docs_file.path)
            assert response.status_code == 200, docs_file.path
            assert response.headers["content-type"] == docs_file.content_type
            assert response.content == docs_file.filename.read_bytes(), docs_file.path
            assert response.headers["content-security-policy"] == DOCS_CONTENT_SECURITY_POLICY
            assert response.headers["x-frame-options"] == "DENY"
        # The API itself keeps the strict policy, and the page is for reading only.
        health = http.get("/health")
        assert (
            health.headers["content-security-policy"]
            == "default-src 'none'; frame-ancestors 'none'"
        )
        assert http.post(DOCS_REST_PATH, json={}).status_code == 404
        assert http.get(f"{DOCS_REST_PATH}/swagger-ui.js").status_code == 404


def test_docs_page_lists_every_operation_in_chromium(full_stack: Stack, tmp_path: Path) -> None:
    url = f"{full_stack.gateway_url}{DOCS_REST_PATH}"

    rendered = chromium("--dump-dom", url)
    parser = _Operations()
    parser.feed(rendered.stdout)

    expected = document_operations()
    assert len(expected) >= 20
    assert parser.operations == expected
    console = [line for line in rendered.stderr.splitlines() if "CONSOLE" in line]
    refused = [line for line in console if "Content Security Policy" in line or "Refused" in line]
    assert not refused, refused

    screenshot = tmp_path / "api-docs.png"
    chromium("--window-size=1280,1400", f"--screenshot={screenshot}", url)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 20_000  # a rendered page, not a blank one
    if os.environ.get("CAKE_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, SCREENSHOT)
