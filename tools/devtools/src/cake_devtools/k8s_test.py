"""``make k8s-test``: Cake on the real cluster of ``make cluster-up``, tested there.

1. builds every image of ``k8s/images.yaml`` and loads it into the node's containerd, tagged
   by content (``cake_devtools.k8s_deploy``);
2. applies ``k8s/overlays/dev`` exactly as the Tiltfile does, waiting for every Deployment,
   StatefulSet and Job (one line each);
3. forwards the gateway's port to 127.0.0.1 (as the Tiltfile's ``port_forwards``) and runs
   ``tests/cluster`` against it: the end-to-end suite, the pod-deletion and rolling-update
   drills, the re-apply, and the prod overlay's server-side dry run;
4. prints a summary: objects and their time to ready, tests, drill figures.

Exit status: pytest's (0 only when every test passed); a missing capability (no cluster, no
engine) fails at once, saying which and how to get it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cake_devtools import images as image_tools
from cake_devtools.k8s_deploy import (
    DeployError,
    Kubectl,
    ReadyObject,
    default_kubeconfig,
    deploy,
    port_forward,
    render,
)
from cake_devtools.k8s_gateway import repository_root

STATE_DIR = Path(".run/k8s-test")
GATEWAY_PORT = 8080


def say(message: str) -> None:
    print(f"k8s-test: {message}", flush=True)


def content_tag(image_id: str) -> str:
    """``k8s-<12 hex>`` of ``sha256:<hex>``: a new tag exactly when the image changed."""
    return "k8s-" + image_id.removeprefix("sha256:")[:12]


def build_and_load(root: Path, names: Sequence[str] = (), *, suffix: str = "") -> dict[str, str]:
    """Build (cached layers make an unchanged image quick), tag by content, load. name → ref.

    ``suffix`` gives the same content a new tag: a new image reference for a rollout.
    """
    specs = image_tools.read_images(root)
    if names:
        specs = tuple(image_tools.select(specs, names))
    image_tools.ensure_base(echo=say)
    references = {}
    for spec in specs:
        image_tools.build_image(root, spec, None, echo=say)
        image_id = image_tools.docker_image_id(spec.ref())
        if image_id is None:
            raise DeployError(f"{spec.ref()} was built but docker does not list it")
        tag = content_tag(image_id) + suffix
        subprocess.run(["docker", "tag", spec.ref(), spec.ref(tag)], check=True)
        image_tools.load_image(spec, tag, echo=say)
        references[spec.name] = spec.ref(tag)
    return references


def retag(references: Mapping[str, str], names: Sequence[str], suffix: str) -> dict[str, str]:
    """The same images under new tags (``<tag><suffix>``), in docker and in the node: what a
    rebuild gives Tilt, without the rebuild. name → new reference."""
    retagged = {}
    for name in names:
        old = references[name]
        new = old + suffix
        subprocess.run(["docker", "tag", old, new], check=True)
        subprocess.run(
            [
                *("ctr", "--namespace", image_tools.CONTAINERD_NAMESPACE, "images", "tag"),
                *(image_tools.containerd_reference(old), image_tools.containerd_reference(new)),
            ],
            check=True,
            capture_output=True,
        )
        retagged[name] = new
    return retagged


def save_references(state: Path, references: Mapping[str, str]) -> None:
    (state / "images.json").write_text(json.dumps(dict(references), indent=2))


def load_references(state: Path) -> dict[str, str]:
    loaded: dict[str, str] = json.loads((state / "images.json").read_text())
    return loaded


def check_cluster(kubectl: Kubectl) -> None:
    result = kubectl.run(
        "get",
        "nodes",
        "-o",
        "jsonpath={.items[*].status.conditions[?(@.type=='Ready')].status}",
        check=False,
        namespaced=False,
        timeout=30,
    )
    if result.returncode != 0 or "True" not in result.stdout.split():
        raise DeployError(
            "no Ready Kubernetes node (kubeconfig "
            f"{kubectl.kubeconfig or 'kubectl default'}): run `make cluster-up` first\n"
            + result.stderr.strip()
        )


def summary(ready: Sequence[ReadyObject], results: Mapping[str, Any], status: int) -> str:
    lines = ["", "== k8s-test summary ==", "", "| object | stage | ready after |", "|---|---|---|"]
    lines += [f"| {o.ref} | {o.stage} | {o.seconds:.1f} s |" for o in ready]
    for name, figures in results.items():
        lines += ["", f"{name}:"]
        lines += [f"  {key}: {value}" for key, value in figures.items()]
    lines += ["", "tests: " + ("all passed" if status == 0 else f"FAILED (pytest exit {status})")]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cake-k8s-test", description=__doc__.splitlines()[0])
    parser.add_argument(
        "pytest_args", nargs="*", help="extra pytest arguments (e.g. -k end_to_end)"
    )
    args = parser.parse_args(argv)
    root = repository_root()
    state = root / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    (state / "results.json").unlink(missing_ok=True)
    kubectl = Kubectl(default_kubeconfig())
    started = time.monotonic()
    try:
        check_cluster(kubectl)
        say("building and loading the images (k8s/images.yaml)")
        references = build_and_load(root)
        save_references(state, references)
        say(f"images ready after {time.monotonic() - started:.0f} s; deploying k8s/overlays/dev")
        ready = deploy(kubectl, render(root, references), say)
        (state / "ready.json").write_text(json.dumps([o.__dict__ for o in ready], indent=2))
    except (DeployError, image_tools.ImagesError) as error:
        say(f"ERROR: {error}")
        return 2
    with port_forward(kubectl, "service/gateway", GATEWAY_PORT) as local_port:
        gateway_url = f"http://127.0.0.1:{local_port}"
        say(f"gateway forwarded to {gateway_url}; running tests/cluster")
        environment = {
            **os.environ,
            "CAKE_K8S_GATEWAY_URL": gateway_url,
            "CAKE_K8S_STATE_DIR": str(state),
            "KUBECONFIG": kubectl.kubeconfig or os.environ.get("KUBECONFIG", ""),
        }
        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "tests/cluster",
                "-p",
                "no:cacheprovider",
                "-o",
                "addopts=-ra --strict-markers --import-mode=importlib",
                # A drill waits for rollouts and Jobs on a 2-core node: minutes, not seconds.
                "-o",
                "timeout=900",
                *args.pytest_args,
            ],
            cwd=root,
            env=environment,
            check=False,
        ).returncode
    results_file = state / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    print(summary(ready, results, status), flush=True)
    say(f"done in {time.monotonic() - started:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
