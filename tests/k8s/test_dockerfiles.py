"""The Dockerfiles lint clean, build what the manifests and pyproject files expect, and copy
only files that exist in the build context. Nothing is built (no Docker engine here)."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cake_devtools.k8s_manifests import RenderedOverlay, pod_spec, venv_tool

SERVICES = ("auth", "promotions", "events")
SERVICE_DOCKERFILE = "services/Dockerfile"
"""One Dockerfile for the three services, parametrised by the SERVICE build argument."""
DOCKERFILES = (SERVICE_DOCKERFILE, "gateway/Dockerfile")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]


def parse(path: Path) -> list[Stage]:
    """Stages with their instructions (continuation lines joined, comments dropped)."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE)
            assert match, line
            stages.append(Stage(match[1], match[2]))
        else:
            stages[-1].instructions.append((instruction, args.strip()))
    return stages


def stage(stages: list[Stage], name: str) -> Stage:
    return next(s for s in stages if s.name == name)


def chain(stages: list[Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    found = [stage(stages, name)]
    aliases = {s.name for s in stages}
    while found[-1].base in aliases:
        found.append(stage(stages, found[-1].base))
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_finds_nothing(repo: Path, dockerfile: str) -> None:
    # Default failure threshold (info): any finding fails. No rule is ignored; should one
    # ever need to be, say why next to it in a .hadolint.yaml.
    result = subprocess.run(
        [venv_tool("hadolint"), "--no-color", str(repo / dockerfile)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint above can fail: an unpinned base image and a root user are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nUSER root\nRUN pip install requests\n")
    result = subprocess.run(
        [venv_tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # always tag the image


def for_service(stages: list[Stage], service: str) -> list[Stage]:
    """The stages as built with ``--build-arg SERVICE=<service>``."""
    return [
        Stage(
            built.base,
            built.name,
            [(name, args.replace("${SERVICE}", service)) for name, args in built.instructions],
        )
        for built in stages
    ]


@pytest.mark.parametrize(
    ("value", "accepted"),
    [*((service, True) for service in SERVICES), ("", False), ("gateway", False), ("auth2", False)],
)
def test_the_service_dockerfile_refuses_a_missing_or_unknown_service(
    repo: Path, value: str, accepted: bool
) -> None:
    builder = stage(parse(repo / SERVICE_DOCKERFILE), "builder")
    assert "SERVICE" in builder.all("ARG")
    first_sync = next(run for run in builder.all("RUN") if "uv sync" in run)
    # The guard runs before anything is installed: run it as the build would, with sh.
    guard = first_sync[first_sync.index("case ") : first_sync.index("esac") + len("esac")]
    result = subprocess.run(
        ["sh", "-c", guard],
        env={"SERVICE": value},
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    )
    assert (result.returncode == 0) == accepted, result.stderr
    if not accepted:
        assert "--build-arg SERVICE=auth|promotions|events" in result.stderr


@pytest.mark.parametrize("service", SERVICES)
def test_service_image_runs_the_packages_console_script(repo: Path, service: str) -> None:
    stages = for_service(parse(repo / SERVICE_DOCKERFILE), service)
    project = tomllib.loads((repo / f"services/{service}/pyproject.toml").read_text())["project"]
    scripts = [name for name, target in project["scripts"].items() if target.endswith("cli:main")]
    assert scripts == [f"cake-{service}"]
    assert stages[-1].name == "runtime", "the deployed stage is the default (last) one"
    for name in ("runtime", "live-update"):
        assert json.loads(stage(stages, name).all("ENTRYPOINT")[-1]) == ["cake-service"]
        assert json.loads(stage(stages, name).all("CMD")[-1]) == ["serve"]
    syncs = [run for run in stage(stages, "builder").all("RUN") if "uv sync" in run]
    assert len(syncs) == 2
    for command in syncs:
        assert "--frozen" in command and "--no-dev" in command
        assert f'--package "{project["name"]}"' in command
    assert "--no-editable" in syncs[-1], "the runtime stage must not need the source tree"
    # The entrypoint is a link, in the virtualenv's bin, to the service's console script.
    assert f'ln -s "{scripts[0]}" /app/.venv/bin/cake-service' in syncs[-1]
    assert f"COPY services/{service}/src services/{service}/src" in [
        f"COPY {args}" for args in stage(stages, "builder").all("COPY")
    ]
    env = " ".join(e for s in chain(stages, "runtime") for e in s.all("ENV"))
    for setting in ("PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1"):
        assert setting in env
    assert "PATH=/app/.venv/bin:" in env
    assert "UV_COMPILE_BYTECODE=1" in " ".join(stage(stages, "builder").all("ENV"))


def test_python_of_the_images_is_the_workspace_python(repo: Path) -> None:
    requires = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["requires-python"]
    image = stage(parse(repo / SERVICE_DOCKERFILE), "python-base").base
    version = re.fullmatch(r"python:(\d+)\.(\d+)\.\d+-slim-\w+", image)
    assert version, image
    assert f">={version[1]}.{version[2]}" in requires, (image, requires)


def uid_of(stage_: Stage) -> int:
    user = stage_.all("USER")[-1]
    return int(user.split(":")[0])


def test_images_run_as_the_uid_the_manifests_expect(repo: Path, dev: RenderedOverlay) -> None:
    expectations = [(SERVICE_DOCKERFILE, service) for service in SERVICES]
    expectations.append(("gateway/Dockerfile", "gateway"))
    for dockerfile, workload in expectations:
        stages = parse(repo / dockerfile)
        expected = pod_spec(dev.get("Deployment", workload))["securityContext"]["runAsUser"]
        for built in stages:
            if built.all("ENTRYPOINT"):
                assert uid_of(built) == expected != 0, (dockerfile, built.name)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_base_images_are_pinned(repo: Path, dockerfile: str) -> None:
    stages = parse(repo / dockerfile)
    aliases = {s.name for s in stages}
    for built in stages:
        if built.base in aliases:
            continue
        name, _, tag = built.base.rpartition(":")
        assert name and re.fullmatch(r"v?\d+(\.\d+)+(-[\w.-]+)?", tag), built.base


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes ``path`` (its patterns, or any parent directory)."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("**/"):
            tail = pattern[3:]
            if any(fnmatch.fnmatch(part, tail) for part in parts):
                return True
        elif any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            return True
    return False


BUILDS = [(SERVICE_DOCKERFILE, service) for service in SERVICES] + [("gateway/Dockerfile", None)]


@pytest.mark.parametrize(("dockerfile", "service"), BUILDS)
def test_copied_files_exist_in_the_build_context(
    repo: Path, dockerfile: str, service: str | None
) -> None:
    patterns = [
        line.strip()
        for line in (repo / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    stages = parse(repo / dockerfile)
    copied = 0
    for built in stages if service is None else for_service(stages, service):
        for args in built.all("COPY"):
            if "--from=" in args:
                continue
            *sources, _ = args.split()
            for source in sources:
                assert "$" not in source, f"{dockerfile}: COPY {source} uses an unknown variable"
                assert (repo / source).exists(), f"{dockerfile}: COPY {source} does not exist"
                assert not ignored(source, patterns), f"{dockerfile}: {source} is .dockerignored"
                copied += 1
    assert copied


def test_dockerignore_keeps_local_state_out(repo: Path) -> None:
    patterns = (repo / ".dockerignore").read_text().splitlines()
    for path in (".venv", ".run/dev/secrets.json", ".git", "services/events/tests/x.py"):
        assert ignored(path, [p for p in patterns if p and not p.startswith("#")]), path
