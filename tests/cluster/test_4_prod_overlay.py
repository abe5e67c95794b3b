"""The prod overlay against the real API server: ``kubectl apply --dry-run=server``.

Every object is admitted by the API server (schemas, defaulting, admission) without being
created. The Strimzi kinds need their CustomResourceDefinitions: they come from Strimzi's own
API artifact on Maven Central (``tools/strimzi-crds``) and are installed for real; the
``cake`` namespace is created for the dry run (objects in a namespace that does not exist
cannot be dry-run) and removed afterwards.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml
from cake_devtools.k8s_deploy import Kubectl
from cake_devtools.k8s_gateway import repository_root
from cake_devtools.k8s_manifests import kustomize_build

PROD_NAMESPACE = "cake"


def strimzi_crds(cache: Path) -> str:
    root = repository_root()
    libs = cache / "libs"
    if not libs.is_dir():
        subprocess.run(
            [
                "mvn",
                "-q",
                "-B",
                "-f",
                str(root / "tools/strimzi-crds/pom.xml"),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={libs}",
            ],
            check=True,
        )
    printed = subprocess.run(
        ["java", "-cp", f"{libs}/*", str(root / "tools/strimzi-crds/PrintCrds.java")],
        capture_output=True,
        text=True,
        check=True,
    )
    return printed.stdout


def test_prod_overlay_passes_a_server_side_dry_run(kubectl: Kubectl, state_dir: Path) -> None:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cake" / "strimzi"
    crds = strimzi_crds(cache)
    kinds = {doc["spec"]["names"]["kind"] for doc in yaml.safe_load_all(crds) if doc}
    assert kinds == {"Kafka", "KafkaNodePool", "KafkaTopic"}
    kubectl.run("apply", "--server-side", "-f", "-", stdin=crds, namespaced=False)
    kubectl.run(
        "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s", namespaced=False
    )

    rendered = [
        doc
        for doc in yaml.safe_load_all(kustomize_build(repository_root() / "k8s/overlays/prod"))
        if doc
    ]
    namespaces = [doc for doc in rendered if doc["kind"] == "Namespace"]
    assert [doc["metadata"]["name"] for doc in namespaces] == [PROD_NAMESPACE]
    kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(namespaces[0]), namespaced=False)
    try:
        others = [doc for doc in rendered if doc["kind"] != "Namespace"]
        result = kubectl.run(
            "apply",
            "--dry-run=server",
            "-f",
            "-",
            stdin=yaml.safe_dump_all(others),
            check=False,
            namespaced=False,
        )
        (state_dir / "prod-dry-run.txt").write_text(result.stdout + result.stderr)
        assert result.returncode == 0, result.stderr
        admitted = [line for line in result.stdout.splitlines() if "(server dry run)" in line]
        assert len(admitted) == len(others), result.stdout
    finally:
        kubectl.run(
            "delete", "namespace", PROD_NAMESPACE, "--wait=false", namespaced=False, check=False
        )
