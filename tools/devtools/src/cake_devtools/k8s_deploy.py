"""Deploy ``k8s/overlays/dev`` to a cluster the way the Tiltfile does, without Tilt.

Tilt cannot be installed everywhere (it is not on this project's CI machines), yet what
``make k8s-test`` runs must be what ``tilt up`` runs. So this module does Tilt's part by the
same rules, and ``tests/k8s/test_tiltfile.py`` checks that the Tiltfile asks for the same:

* the same images: every entry of ``k8s/images.yaml`` (``cake_devtools.images``), tagged by
  content (``<name>:k8s-<image id>``, as Tilt tags ``tilt-<hash>``), so a changed image rolls
  out and an unchanged one does not;
* the same objects: ``kubectl kustomize k8s/overlays/dev`` plus the JWT key Secret and the
  JWKS ConfigMap made from ``.run/k8s-dev/keys`` (``cake-auth gen-keys --if-missing``), with
  each image reference replaced by the built tag and ``imagePullPolicy: IfNotPresent``;
* the same order: the Tiltfile's ``resource_deps`` (datastores, then the topic and migration
  Jobs, then the services, then the gateway), each stage applied once the one before is ready;
* the same recovery: an object the API server refuses to update in place (a Job's pod
  template is immutable) is deleted and created again, which is what Tilt falls back to.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cake_devtools.cluster.layout import default_state_dir
from cake_devtools.k8s_manifests import (
    WORKLOAD_KINDS,
    Manifest,
    ManifestError,
    kustomize_build,
    venv_tool,
)
from cake_devtools.stack.service_tokens import ensure_client_secret

NAMESPACE = "cake-dev"
#: Where the Tiltfile keeps the dev cluster's signing key (never committed).
KEYS_DIR = Path(".run/k8s-dev/keys")
SIGNING_KEY_FILE = "jwt-signing-key.pem"
JWKS_FILE = "jwks.json"
#: The client secret of notifications' service account (made once, like the keys): the
#: auth-service-accounts Job registers it, notifications requests its tokens with it.
NOTIFICATIONS_CLIENT_SECRET_FILE = "notifications-client-secret"  # noqa: S105 - a file name

#: Stages of the Tiltfile's resource_deps: each workload (kind, name) and the stage it is in.
#: Everything that is not a workload (Services, ConfigMaps, policies...) goes in stage 0.
STAGES: tuple[tuple[str, frozenset[str]], ...] = (
    ("datastores", frozenset({"postgres", "redis", "kafka"})),
    (
        "topics and migrations",
        frozenset(
            {
                "kafka-topics",
                "auth-migrate",
                "promotions-migrate",
                "events-migrate",
                "notifications-migrate",
            }
        ),
    ),
    # The dev stand-ins: the bank simulator promotions charges through, the SMTP sink
    # notifications sends e-mail to.
    ("dev stand-ins", frozenset({"payments", "smtp-sink"})),
    # Registers the services' accounts in auth's database (migrated in the stage before).
    ("service accounts", frozenset({"auth-service-accounts"})),
    ("services", frozenset({"auth", "promotions", "notifications", "events"})),
    ("gateway", frozenset({"gateway"})),
)

Log = Callable[[str], None]


class DeployError(RuntimeError):
    """The deployment could not be applied or did not become ready."""


# -- pure parts (unit-tested) ---------------------------------------------------------------


def key_objects(
    namespace: str, signing_key_pem: str, jwks_json: str, notifications_client_secret: str
) -> list[Manifest]:
    """The Secrets and ConfigMap the Tiltfile makes from the key files (same names, keys)."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "auth-jwt-signing-key", "namespace": namespace},
            "type": "Opaque",
            "stringData": {SIGNING_KEY_FILE: signing_key_pem},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "jwks", "namespace": namespace},
            "data": {JWKS_FILE: jwks_json},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "notifications-auth-client", "namespace": namespace},
            "type": "Opaque",
            "stringData": {"client-secret": notifications_client_secret},
        },
    ]


def image_repository(reference: str) -> str:
    """``cake-auth`` of ``cake-auth:dev`` or ``cake-auth@sha256:...`` (registry ports kept)."""
    without_digest = reference.split("@", 1)[0]
    last_slash = without_digest.rfind("/")
    colon = without_digest.rfind(":")
    return without_digest[:colon] if colon > last_slash else without_digest


def pod_spec(manifest: Manifest) -> dict[str, Any] | None:
    if manifest.get("kind") not in WORKLOAD_KINDS:
        return None
    spec: dict[str, Any] = manifest["spec"]["template"]["spec"]
    return spec


def inject_images(objects: Iterable[Manifest], references: Mapping[str, str]) -> list[Manifest]:
    """Copies of ``objects`` whose containers run the built images.

    A container whose image repository is a key of ``references`` gets that reference and
    ``imagePullPolicy: IfNotPresent`` (the images exist only in the node's containerd). Any
    other image is left alone, so a reference to something not built here fails visibly at
    pull time instead of running a stale copy.
    """
    result = []
    for original in objects:
        manifest = copy.deepcopy(original)
        spec = pod_spec(manifest)
        if spec is not None:
            for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
                repository = image_repository(container["image"])
                if repository in references:
                    container["image"] = references[repository]
                    container["imagePullPolicy"] = "IfNotPresent"
        result.append(manifest)
    return result


def unbuilt_images(objects: Iterable[Manifest], references: Mapping[str, str]) -> list[str]:
    """Images the objects run that are not among the built ones (nothing can be pulled)."""
    missing = set()
    for manifest in objects:
        spec = pod_spec(manifest)
        if spec is None:
            continue
        for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
            if container["image"] not in references.values():
                missing.add(container["image"])
    return sorted(missing)


def stage_of(manifest: Manifest) -> int:
    """0 for configuration, then 1.. for the workloads in Tiltfile resource_deps order."""
    if manifest.get("kind") not in WORKLOAD_KINDS:
        return 0
    name = manifest["metadata"]["name"]
    for index, (_, names) in enumerate(STAGES, start=1):
        if name in names:
            return index
    raise ManifestError(
        f"{manifest['kind']} {name} is in no deployment stage: add it to "
        "cake_devtools.k8s_deploy.STAGES (and to the Tiltfile's resource_deps)"
    )


def stages(objects: Sequence[Manifest]) -> list[tuple[str, list[Manifest]]]:
    """The objects grouped in apply order; stage 0 (configuration) first."""
    grouped: dict[int, list[Manifest]] = {}
    for manifest in objects:
        grouped.setdefault(stage_of(manifest), []).append(manifest)
    names = ["configuration", *(name for name, _ in STAGES)]
    return [(names[index], grouped[index]) for index in sorted(grouped)]


def is_immutable_error(stderr: str) -> bool:
    return "field is immutable" in stderr or "cannot change" in stderr.lower()


def object_ref(manifest: Manifest) -> str:
    return f"{manifest['kind'].lower()}/{manifest['metadata']['name']}"


# -- the cluster side -----------------------------------------------------------------------


@dataclass(frozen=True)
class Kubectl:
    """``kubectl`` of this virtualenv against one cluster (``KUBECONFIG``) and namespace."""

    kubeconfig: str | None
    namespace: str = NAMESPACE

    def command(self, *args: str, namespaced: bool = True) -> list[str]:
        command = [venv_tool("kubectl")]
        if self.kubeconfig:
            command += ["--kubeconfig", self.kubeconfig]
        if namespaced:
            command += ["--namespace", self.namespace]
        return [*command, *args]

    def run(
        self,
        *args: str,
        stdin: str | None = None,
        check: bool = True,
        timeout: float = 300,
        namespaced: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.command(*args, namespaced=namespaced),
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise DeployError(
                f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr.strip()}"
            )
        return result

    def get_json(self, *args: str) -> Any:
        return json.loads(self.run("get", *args, "-o", "json").stdout)


def default_kubeconfig() -> str | None:
    """``KUBECONFIG``, else the admin kubeconfig ``make cluster-up`` writes, else kubectl's."""
    if os.environ.get("KUBECONFIG"):
        return os.environ["KUBECONFIG"]
    cluster_admin = default_state_dir() / "admin.conf"
    return str(cluster_admin) if cluster_admin.is_file() else None


def ensure_dev_keys(repo: Path) -> tuple[str, str, str]:
    """The Tiltfile's ``cake-auth gen-keys --if-missing --dir .run/k8s-dev/keys``, and the
    notifications client secret made next to them (also once)."""
    keys = repo / KEYS_DIR
    subprocess.run(
        [venv_tool("cake-auth"), "gen-keys", "--if-missing", "--dir", str(keys)],
        check=True,
        capture_output=True,
        text=True,
    )
    return (
        (keys / SIGNING_KEY_FILE).read_text(),
        (keys / JWKS_FILE).read_text(),
        ensure_client_secret(keys / NOTIFICATIONS_CLIENT_SECRET_FILE),
    )


def render(repo: Path, references: Mapping[str, str]) -> list[Manifest]:
    """Everything ``tilt up`` applies: the overlay with built images, plus the key objects."""
    documents = yaml.safe_load_all(kustomize_build(repo / "k8s" / "overlays" / "dev"))
    overlay = [doc for doc in documents if doc]
    pem, jwks, client_secret = ensure_dev_keys(repo)
    objects = inject_images(
        [*overlay, *key_objects(NAMESPACE, pem, jwks, client_secret)], references
    )
    missing = unbuilt_images(objects, references)
    if missing:
        raise DeployError(
            "the dev overlay runs images that are not built here (nothing can be pulled): "
            + ", ".join(missing)
        )
    return objects


def apply(kubectl: Kubectl, objects: Sequence[Manifest], log: Log) -> None:
    """``kubectl apply``; an object refused as immutable is deleted and created again."""
    batch = yaml.safe_dump_all(objects, sort_keys=False)
    result = kubectl.run("apply", "-f", "-", stdin=batch, check=False)
    if result.returncode == 0:
        return
    if not is_immutable_error(result.stderr):
        raise DeployError(f"kubectl apply failed:\n{result.stderr.strip()}")
    # Everything else of the batch is applied by now; find the refused objects one by one.
    for manifest in objects:
        document = yaml.safe_dump(manifest, sort_keys=False)
        result = kubectl.run("apply", "-f", "-", stdin=document, check=False)
        if result.returncode == 0:
            continue
        if not is_immutable_error(result.stderr):
            raise DeployError(f"apply {object_ref(manifest)} failed:\n{result.stderr.strip()}")
        log(f"  {object_ref(manifest)}: immutable fields changed, deleting and creating again")
        kubectl.run("delete", object_ref(manifest), "--wait=true", "--ignore-not-found")
        kubectl.run("apply", "-f", "-", stdin=document)


def wait_ready(kubectl: Kubectl, manifest: Manifest, timeout: float) -> None:
    """Until a Deployment/StatefulSet has rolled out or a Job has completed."""
    ref = object_ref(manifest)
    if manifest["kind"] == "Job":
        deadline = time.monotonic() + timeout
        while True:
            job = kubectl.get_json(ref)
            conditions = {c["type"]: c["status"] for c in job["status"].get("conditions", [])}
            if conditions.get("Complete") == "True":
                return
            if conditions.get("Failed") == "True":
                logs = kubectl.run("logs", ref, "--tail=40", check=False).stdout
                raise DeployError(f"{ref} failed; its last log lines:\n{logs}")
            if time.monotonic() > deadline:
                raise DeployError(f"{ref} did not complete in {timeout:.0f} s")
            time.sleep(1)
    result = kubectl.run(
        "rollout", "status", ref, f"--timeout={int(timeout)}s", check=False, timeout=timeout + 30
    )
    if result.returncode != 0:
        pods = kubectl.run("get", "pods", "-o", "wide", check=False).stdout
        raise DeployError(f"{ref} not ready in {timeout:.0f} s: {result.stderr.strip()}\n{pods}")


@dataclass(frozen=True)
class ReadyObject:
    stage: str
    ref: str
    seconds: float


def deploy(
    kubectl: Kubectl,
    objects: Sequence[Manifest],
    log: Log,
    timeout: float = 600,
) -> list[ReadyObject]:
    """Apply stage by stage, waiting for every workload of a stage: one line per object."""
    ready: list[ReadyObject] = []
    started = time.monotonic()
    for stage, members in stages(objects):
        stage_started = time.monotonic()
        log(f"apply {stage}: {len(members)} objects")
        apply(kubectl, members, log)
        for manifest in members:
            if manifest["kind"] not in WORKLOAD_KINDS:
                continue
            wait_ready(kubectl, manifest, timeout)
            seconds = time.monotonic() - stage_started
            ready.append(ReadyObject(stage, object_ref(manifest), seconds))
            log(f"  ready  {object_ref(manifest):<32} {seconds:6.1f} s after its stage began")
    log(f"deployed in {time.monotonic() - started:.1f} s")
    return ready


@contextlib.contextmanager
def port_forward(kubectl: Kubectl, target: str, remote_port: int) -> Iterator[int]:
    """``kubectl port-forward TARGET :REMOTE`` for the block; yields the local port.

    The port is on 127.0.0.1 only: test traffic never leaves this machine's loopback.
    """
    process = subprocess.Popen(
        kubectl.command("port-forward", "--address", "127.0.0.1", target, f":{remote_port}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+) ->", line)
        if match is None:
            error = process.stderr.read() if process.stderr else ""
            raise DeployError(f"kubectl port-forward {target} failed: {line}{error}".strip())
        # Keep draining its output so a full pipe never blocks it.
        threading.Thread(target=process.stdout.read, daemon=True).start()
        yield int(match.group(1))
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
