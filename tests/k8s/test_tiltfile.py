"""The Tiltfile, evaluated by a Starlark interpreter with stand-ins for Tilt's built-ins that
record every call: what it builds exists, every workload of the dev overlay is a resource,
resources start in order (infra -> migrations -> services -> gateway)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import starlark
import yaml
from cake_devtools import k8s_deploy, k8s_test
from cake_devtools.images import IMAGES_FILE, read_images
from cake_devtools.k8s_manifests import RenderedOverlay, containers, kustomize_build

SERVICES = ("auth", "promotions", "events")
RESTART_EXTENSION = "ext://restart_process"


@dataclass
class TiltCalls:
    """What the Tiltfile asked Tilt to do, in call order."""

    repo: Path
    docker_builds: list[dict[str, Any]] = field(default_factory=list)
    k8s_yaml: list[str] = field(default_factory=list)
    kustomized: list[str] = field(default_factory=list)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    local_resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    local_commands: list[str] = field(default_factory=list)
    files_read: list[str] = field(default_factory=list)
    yaml_read: list[str] = field(default_factory=list)
    loads: list[str] = field(default_factory=list)

    def builtins(self) -> dict[str, Callable[..., object]]:
        return {
            "docker_build": self.docker_build,
            "k8s_yaml": self.record_yaml,
            "kustomize": self.kustomize,
            "k8s_resource": self.k8s_resource,
            "local_resource": self.local_resource,
            "local": self.local,
            "read_file": self.read_file,
            "read_yaml": self.read_yaml,
            "encode_yaml": yaml.safe_dump,
            "sync": lambda src, dest: {"step": "sync", "src": src, "dest": dest},
            "run": lambda cmd, trigger=(): {"step": "run", "cmd": cmd, "trigger": trigger},
            "version_settings": lambda **kwargs: None,
        }

    def docker_build(self, ref: str, context: str, **kwargs: Any) -> None:
        self.docker_builds.append({"ref": ref, "context": context, **kwargs})

    def docker_build_with_restart(
        self,
        ref: str,
        context: str,
        entrypoint: str | list[str],
        live_update: list[dict[str, Any]],
        **kwargs: Any,
    ) -> None:
        # The extension's contract: at least one live_update step, and it appends the run
        # step that writes restart_file (the wrapper restarts the entrypoint on change).
        assert live_update, "docker_build_with_restart needs live_update steps"
        restart_file = kwargs.pop("restart_file", "/tmp/.restart-proc")
        steps = [*live_update, {"step": "run", "cmd": f"date > {restart_file}"}]
        self.docker_build(
            ref,
            context,
            entrypoint=entrypoint,
            live_update=steps,
            restart_file=restart_file,
            **kwargs,
        )

    def record_yaml(self, blob: str) -> None:
        self.k8s_yaml.append(blob)

    def kustomize(self, path: str) -> str:
        self.kustomized.append(path)
        return kustomize_build(self.repo / path)

    def k8s_resource(self, workload: str, **kwargs: Any) -> None:
        assert workload not in self.resources, f"k8s_resource({workload!r}) twice"
        self.resources[workload] = kwargs

    def local_resource(self, name: str, **kwargs: Any) -> None:
        self.local_resources[name] = kwargs

    def local(self, command: str, quiet: bool = False) -> str:
        self.local_commands.append(command)
        return ""

    def read_file(self, path: str) -> str:
        self.files_read.append(path)
        return f"stand-in content of {path}"

    def read_yaml(self, path: str) -> Any:
        self.yaml_read.append(path)
        return yaml.safe_load((self.repo / path).read_text())

    def load_module(self, name: str) -> starlark.FrozenModule:
        self.loads.append(name)
        assert name == RESTART_EXTENSION, f"unexpected load({name!r})"
        module = starlark.Module()
        module.add_callable("docker_build_with_restart", self.docker_build_with_restart)
        return module.freeze()


@pytest.fixture(scope="module")
def tilt(repo: Path) -> TiltCalls:
    calls = TiltCalls(repo)
    module = starlark.Module()
    for name, function in calls.builtins().items():
        module.add_callable(name, function)
    source = (repo / "Tiltfile").read_text()
    # Tilt's dialect allows top-level for loops and load(): the extended one.
    ast = starlark.parse("Tiltfile", source, starlark.Dialect.extended())
    starlark.eval(module, ast, starlark.Globals.standard(), starlark.FileLoader(calls.load_module))
    return calls


def build_of(tilt: TiltCalls, ref: str) -> dict[str, Any]:
    (build,) = [b for b in tilt.docker_builds if b["ref"] == ref]
    return build


def stage_text(dockerfile: str, name: str) -> str:
    """The instructions of one stage (up to the next FROM)."""
    match = re.search(
        rf"^FROM \S+ AS {re.escape(name)}\n(.*?)(?=^FROM |\Z)", dockerfile, re.M | re.S
    )
    assert match, f"no stage {name}"
    return match[1]


def copy_sources(dockerfile: str) -> list[str]:
    sources = []
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    return sources


def test_tilt_builds_exactly_the_image_list(tilt: TiltCalls, repo: Path) -> None:
    """k8s/images.yaml is the one list: Tilt builds each image of it once, as it says, and
    nothing else (`cake-images build` builds the same list)."""
    assert tilt.yaml_read == [str(IMAGES_FILE)]
    images = read_images(repo)
    assert [b["ref"] for b in tilt.docker_builds] == [i.name for i in images]
    for image, build in zip(images, tilt.docker_builds, strict=True):
        assert build["context"] == image.context
        assert build["dockerfile"] == image.dockerfile
        assert build.get("build_args", {}) == dict(image.build_args)
        assert build.get("target") == image.target
        assert build["only"] == list(image.only)
        assert ("live_update" in build) == bool(image.sync), image.name


def test_every_image_build_exists_and_builds_what_its_dockerfile_copies(
    tilt: TiltCalls, repo: Path
) -> None:
    for build in tilt.docker_builds:
        context = repo / build["context"]
        dockerfile_path = repo / build["dockerfile"]
        assert context.is_dir() and context.resolve().is_relative_to(repo), build["ref"]
        assert dockerfile_path.is_file(), build["dockerfile"]
        dockerfile = dockerfile_path.read_text()
        for name, value in build.get("build_args", {}).items():
            dockerfile = dockerfile.replace("${" + name + "}", value)
        # `only` narrows the context: it must still hold everything the Dockerfile copies.
        only = build["only"]
        for path in only:
            assert (context / path).exists(), f"{build['ref']}: only={path} does not exist"
        for source in copy_sources(dockerfile):
            assert "$" not in source, f"{build['ref']}: {source} needs a build argument"
            assert any(
                source.rstrip("/") == p or source.startswith(p.rstrip("/") + "/") for p in only
            ), f"{build['ref']}: {source} is copied but not in only={only}"
        if "target" in build:
            stage_text(dockerfile, build["target"])


def images_python(dockerfile: str) -> str:
    """``X.Y`` of the Debian Python the service images install (python-base stage)."""
    python = re.search(r"\bpython(\d+\.\d+)=\1\.\*", stage_text(dockerfile, "python-base"))
    assert python, "python-base installs no pinned pythonX.Y"
    return python[1]


@pytest.mark.parametrize("service", SERVICES)
def test_services_live_update_their_python_sources(
    tilt: TiltCalls, repo: Path, service: str
) -> None:
    build = build_of(tilt, f"cake-{service}")
    dockerfile = (repo / build["dockerfile"]).read_text()
    live_stage = stage_text(dockerfile, build["target"])
    # The restart wrapper runs the image's entrypoint; the stage creates the file it watches,
    # and the manifests pass the subcommand as args.
    entrypoint = re.search(r'^ENTRYPOINT \["([^"]+)"\]', live_stage, re.M)
    assert entrypoint and build["entrypoint"] == [entrypoint[1]]
    assert build["restart_file"] in live_stage
    # Site-packages of the image's interpreter.
    site_packages = f"/app/.venv/lib/python{images_python(dockerfile)}/site-packages"
    syncs = {s["src"]: s["dest"] for s in build["live_update"] if s["step"] == "sync"}
    assert syncs[f"services/{service}/src/cake_{service}"] == f"{site_packages}/cake_{service}"
    assert syncs["libs/common/src/cake_common"] == f"{site_packages}/cake_common"
    for src, dest in syncs.items():
        assert (repo / src).is_dir(), src
        assert dest == f"{site_packages}/{Path(src).name}", src
        # Tilt syncs only what it watches: the folder is in the image's build context.
        assert any(src == p or src.startswith(p + "/") for p in build["only"]), src
    assert build["live_update"][-1]["step"] == "run", "the process restarts after the sync"


def test_the_dev_overlay_is_what_tilt_deploys(tilt: TiltCalls, dev: RenderedOverlay) -> None:
    assert tilt.kustomized == ["k8s/overlays/dev"]
    rendered = yaml.safe_load_all(tilt.k8s_yaml[-1])
    assert {d["kind"] for d in rendered if d} >= {"Deployment", "StatefulSet", "Job"}
    # Every cake image the overlay runs is built by Tilt, and Tilt builds nothing else.
    images = {c["image"].split(":")[0] for w in dev.workloads() for c in containers(w)}
    cake_images = {i for i in images if i.startswith("cake-")}
    assert cake_images == {b["ref"] for b in tilt.docker_builds}


def test_keys_are_made_locally_and_never_read_from_git(
    tilt: TiltCalls, dev: RenderedOverlay, repo: Path
) -> None:
    keys_command = next(c for c in tilt.local_commands if "gen-keys" in c)
    assert "--if-missing" in keys_command
    for path in tilt.files_read:
        assert path.startswith(".run/"), path
        ignored = subprocess.run(
            ["git", "check-ignore", "--quiet", path], cwd=repo, check=False
        ).returncode
        assert ignored == 0, f"{path} is not git-ignored"
    generated = [yaml.safe_load(blob) for blob in tilt.k8s_yaml[:-1]]
    assert {(g["kind"], g["metadata"]["name"]) for g in generated} == {
        ("Secret", "auth-jwt-signing-key"),
        ("ConfigMap", "jwks"),
        ("Secret", "notifications-auth-client"),
    }
    for manifest in generated:
        assert manifest["metadata"]["namespace"] == dev.namespace
    secrets = {g["metadata"]["name"]: g for g in generated if g["kind"] == "Secret"}
    assert set(secrets["auth-jwt-signing-key"]["stringData"]) == {"jwt-signing-key.pem"}
    assert set(secrets["notifications-auth-client"]["stringData"]) == {"client-secret"}
    # A client secret is made (once) for notifications' service account; no token is signed.
    secret_command = next(c for c in tilt.local_commands if "service_tokens" in c)
    assert secret_command.endswith(f"{k8s_deploy.KEYS_DIR}/notifications-client-secret")
    assert not any("jwt-signing-key" in c for c in tilt.local_commands)
    assert set(next(g for g in generated if g["kind"] == "ConfigMap")["data"]) == {"jwks.json"}


def test_every_workload_is_a_resource_and_attached_objects_exist(
    tilt: TiltCalls, dev: RenderedOverlay
) -> None:
    workloads = {w["metadata"]["name"] for w in dev.workloads()}
    assert set(tilt.resources) == workloads
    for resource, options in tilt.resources.items():
        for selector in options.get("objects", []):
            name, kind = selector.split(":")[:2]
            assert any(
                o["metadata"]["name"] == name and o["kind"].lower() == kind for o in dev.objects
            ), f"{resource}: {selector} matches nothing"


def closure(tilt: TiltCalls, resource: str) -> set[str]:
    """Every resource that must be up before ``resource`` starts."""
    pending = list(tilt.resources.get(resource, {}).get("resource_deps", []))
    seen: set[str] = set()
    while pending:
        dependency = pending.pop()
        assert dependency != resource, f"dependency cycle through {resource}"
        if dependency not in seen:
            seen.add(dependency)
            pending += tilt.resources.get(dependency, {}).get("resource_deps", [])
    return seen


def test_resources_start_in_order(tilt: TiltCalls) -> None:
    known = set(tilt.resources) | set(tilt.local_resources)
    for resource, options in tilt.resources.items():
        for dependency in options.get("resource_deps", []):
            assert dependency in known, f"{resource} depends on unknown {dependency}"
    for service in SERVICES:
        assert {"postgres"} <= closure(tilt, f"{service}-migrate")
        assert {f"{service}-migrate", "postgres"} <= closure(tilt, service)
        assert tilt.resources[service]["labels"] == ["services"]
    assert {"redis"} <= closure(tilt, "auth")
    assert {"kafka", "kafka-topics"} <= closure(tilt, "promotions")
    # The relay reads the other services' outbox tables: their migrations come first.
    assert {"auth-migrate", "promotions-migrate", "kafka-topics"} <= closure(tilt, "events")
    assert set(SERVICES) <= closure(tilt, "gateway")
    # Notifications' service account is registered (in auth's migrated database) before it
    # starts; the Job may have to revoke old tokens, so Redis is up too.
    assert {"auth-migrate", "postgres", "redis"} <= closure(tilt, "auth-service-accounts")
    assert {"auth-service-accounts", "notifications-migrate"} <= closure(tilt, "notifications")
    for infra in ("postgres", "redis", "kafka"):
        assert tilt.resources[infra]["labels"] == ["infra"]
        assert not closure(tilt, infra)


def test_gateway_is_forwarded_to_port_8080(tilt: TiltCalls, dev: RenderedOverlay) -> None:
    forwards = tilt.resources["gateway"]["port_forwards"]
    assert "8080:8080" in forwards
    (envoy,) = dev.get("Deployment", "gateway")["spec"]["template"]["spec"]["containers"]
    assert 8080 in {p["containerPort"] for p in envoy["ports"]}


def test_contracts_are_regenerated_when_protos_change(tilt: TiltCalls, repo: Path) -> None:
    (codegen,) = [r for r in tilt.local_resources.values() if "cake-codegen" in r["cmd"]]
    assert "protos" in codegen["deps"]
    assert "cake_devtools.k8s_gateway" in codegen["cmd"]
    for dependency in codegen["deps"]:
        assert (repo / dependency).exists(), dependency
    assert tilt.loads == [RESTART_EXTENSION]


# -- make k8s-test deploys what Tilt deploys (cake_devtools.k8s_deploy) ---------------------


def test_k8s_test_applies_in_the_tiltfile_order(tilt: TiltCalls) -> None:
    """Each stage of k8s_deploy starts after every resource it depends on in the Tiltfile."""
    stage = {name: index for index, (_, names) in enumerate(k8s_deploy.STAGES) for name in names}
    assert set(stage) == set(tilt.resources)
    for resource in tilt.resources:
        for dependency in closure(tilt, resource):
            assert stage[dependency] < stage[resource], (dependency, resource)


def test_k8s_test_makes_the_tiltfile_key_objects(tilt: TiltCalls) -> None:
    generated = [yaml.safe_load(blob) for blob in tilt.k8s_yaml[:-1]]
    pem, jwks, client_secret = (
        f"stand-in content of .run/k8s-dev/keys/{name}"
        for name in (
            k8s_deploy.SIGNING_KEY_FILE,
            k8s_deploy.JWKS_FILE,
            k8s_deploy.NOTIFICATIONS_CLIENT_SECRET_FILE,
        )
    )
    assert str(k8s_deploy.KEYS_DIR) in next(c for c in tilt.local_commands if "gen-keys" in c)
    assert k8s_deploy.key_objects(k8s_deploy.NAMESPACE, pem, jwks, client_secret) == generated


def test_k8s_test_forwards_the_gateway_port_tilt_forwards(tilt: TiltCalls) -> None:
    assert f"8080:{k8s_test.GATEWAY_PORT}" in tilt.resources["gateway"]["port_forwards"]
