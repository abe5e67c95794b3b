"""The node's own images (pod sandbox and CoreDNS), built from the static binaries.

Nothing can be pulled on this machine, so each is a ``FROM scratch`` image built with
Docker's legacy builder under the tag kubeadm and the kubelet expect, then copied into
containerd's ``k8s.io`` namespace, where the kubelet looks for images.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cake_devtools.cluster.engine import docker_binary, run_ctr
from cake_devtools.cluster.errors import ClusterError
from cake_devtools.cluster.layout import CONTAINERD_SOCKET
from cake_devtools.cluster.system import daemon_env, run, which


@dataclass(frozen=True)
class NodeImage:
    tag: str
    binary: Path
    dockerfile: str


def pause_dockerfile() -> str:
    return 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n'


def coredns_dockerfile() -> str:
    # Runs as root with only NET_BIND_SERVICE: kubeadm's Deployment drops every other
    # capability and adds that one, which a non-root user could not use without file caps.
    return 'FROM scratch\nCOPY coredns /coredns\nEXPOSE 53 53/udp\nENTRYPOINT ["/coredns"]\n'


def build_env() -> dict[str, str]:
    return daemon_env({"DOCKER_BUILDKIT": "0"})


def in_containerd(tag: str) -> bool:
    listed = run_ctr("-n", "k8s.io", "images", "ls", "-q", f"name=={tag}")
    return tag in listed.split()


def build_and_import(image: NodeImage) -> None:
    docker = docker_binary()
    with tempfile.TemporaryDirectory(prefix="cake-image-") as context:
        shutil.copy2(image.binary, Path(context) / image.binary.name)
        (Path(context) / "Dockerfile").write_text(image.dockerfile)
        run([docker, "build", "-q", "-t", image.tag, context], env=build_env())
    save = subprocess.Popen([docker, "save", image.tag], stdout=subprocess.PIPE, env=daemon_env())
    try:
        result = subprocess.run(
            [which("ctr"), "--address", CONTAINERD_SOCKET, "-n", "k8s.io", "images", "import", "-"],
            stdin=save.stdout,
            capture_output=True,
            text=True,
            env=daemon_env(),
            timeout=300,
            check=False,
        )
    finally:
        if save.stdout:
            save.stdout.close()
        save.wait(timeout=60)
    if save.returncode != 0 or result.returncode != 0:
        raise ClusterError(f"importing {image.tag} into containerd failed: {result.stderr.strip()}")
    if not in_containerd(image.tag):
        raise ClusterError(f"{image.tag} not in containerd's k8s.io namespace after import")


def ensure_images(images: list[NodeImage]) -> str:
    done = []
    for image in images:
        if in_containerd(image.tag):
            continue
        build_and_import(image)
        done.append(image.tag)
    return f"built and imported {', '.join(done)}" if done else "already in containerd"
