"""Where a profile keeps its data, logs, pid files, generated configs and secrets.

Everything lives under ``<repo>/.run/`` (git-ignored): ``.run/<profile>/`` per profile and
``.run/kafka-libs/<version>/`` for the broker jars that both profiles share.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cake_devtools.stack.errors import StackError


class RepoNotFoundError(StackError):
    """The stack tooling runs outside a Cake checkout."""


def repo_root() -> Path:
    """The checkout this package is installed from (an editable workspace member)."""
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for parent in (start, *start.parents):
            if (parent / "tools" / "kafka" / "pom.xml").is_file() and (
                parent / "pyproject.toml"
            ).is_file():
                return parent
    raise RepoNotFoundError("cannot find the Cake checkout (no tools/kafka/pom.xml above here)")


@dataclass(frozen=True)
class RunLayout:
    """Paths of one profile's run dir; nothing is created until a component needs it."""

    repo: Path
    profile: str

    @property
    def run_root(self) -> Path:
        return self.repo / ".run"

    @property
    def root(self) -> Path:
        return self.run_root / self.profile

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pids(self) -> Path:
        return self.root / "pids"

    @property
    def secrets_file(self) -> Path:
        return self.root / "secrets.json"

    @property
    def postgres(self) -> Path:
        return self.root / "postgres"

    @property
    def redis(self) -> Path:
        return self.root / "redis"

    @property
    def kafka(self) -> Path:
        return self.root / "kafka"

    @property
    def envoy(self) -> Path:
        return self.root / "envoy"

    @property
    def sockets(self) -> Path:
        """Unix sockets of services that run several worker processes (auth)."""
        return self.root / "sockets"

    @property
    def keys(self) -> Path:
        """Development JWT keys (``cake-auth gen-keys``): signing key and published JWKS."""
        return self.root / "keys"

    def env_file(self, service: str) -> Path:
        """Dotenv file with a service's variables, for operator commands (``<svc>.env``)."""
        return self.root / f"{service}.env"

    @property
    def jwt_signing_key(self) -> Path:
        return self.keys / "jwt-signing-key.pem"

    @property
    def jwks_file(self) -> Path:
        return self.keys / "jwks.json"

    @property
    def kafka_pom(self) -> Path:
        return self.repo / "tools" / "kafka" / "pom.xml"

    def kafka_libs(self, version: str) -> Path:
        return self.run_root / "kafka-libs" / version

    def log(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    def pid_file(self, component: str) -> Path:
        return self.pids / f"{component}.json"

    def make_dirs(self) -> None:
        # 0o755: the PostgreSQL server runs as another OS user when we are root and must be
        # able to traverse down to its data dir.
        for path in (self.root, self.logs, self.pids):
            path.mkdir(mode=0o755, parents=True, exist_ok=True)
