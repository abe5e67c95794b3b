"""The README and docs/ link only inside the repository, and every link lands: the file
exists and, for an anchor, the heading it names does (the slug GitHub makes of it)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[2]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
LOCAL_HOSTS = ("http://127.0.0.1", "http://localhost", "https://127.0.0.1", "https://localhost")


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _slug(heading: str) -> str:
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(document: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", document.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


def test_no_markdown_file_links_outside_the_repository() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    outside = [
        f"{name}: {target}"
        for name in tracked
        for target in LINK.findall((ROOT / name).read_text(encoding="utf-8"))
        if re.match(r"[a-z]+://", target) and not target.startswith(LOCAL_HOSTS)
    ]
    assert not outside, outside


def test_every_link_of_the_readme_and_docs_lands() -> None:
    broken = []
    for document in _documents():
        for target in LINK.findall(document.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            landing = (document.parent / path).resolve() if path else document
            if not landing.exists():
                broken.append(f"{document.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and landing.suffix == ".md" and anchor not in _anchors(landing):
                broken.append(f"{document.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_a_broken_anchor_is_seen() -> None:
    assert "the-local-stack" in _anchors(ROOT / "docs" / "configuration.md")
    assert "no-such-heading" not in _anchors(ROOT / "docs" / "configuration.md")
    assert _slug("An event: first login → voucher") == "an-event-first-login--voucher"
