"""Generated passwords of a profile, kept in ``.run/<profile>/secrets.json`` (mode 0600).

They are created on first use and then reused, so databases initialised earlier keep working.
Nothing here is ever printed; :func:`redact` scrubs them from log excerpts shown on errors.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

#: The PostgreSQL superuser of a cluster the stack runs itself.
POSTGRES_SUPERUSER = "postgres"


def load_or_create(path: Path, names: Iterable[str]) -> dict[str, str]:
    """Passwords for ``names``: the stored ones, plus new random ones for missing names."""
    stored: dict[str, str] = {}
    if path.is_file():
        loaded = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} is not a JSON object")
        stored = {str(key): str(value) for key, value in loaded.items()}
    missing = [name for name in names if name not in stored]
    if missing:
        # URL-safe alphabet: the passwords go into database URLs unescaped by other tools.
        stored.update({name: secrets.token_urlsafe(24) for name in missing})
        write_private(path, json.dumps(stored, indent=2, sort_keys=True) + "\n")
    return stored


def redact(text: str, passwords: Iterable[str]) -> str:
    for password in passwords:
        if password:
            text = text.replace(password, "***")
    return text


def write_private(path: Path, text: str) -> None:
    """``text`` into ``path``, readable by its owner only, replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # Created 0600 from the start (not chmod-ed afterwards), so it is never world-readable.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    tmp.replace(path)
