"""Where the cluster keeps its state, and the versions it runs.

Two roots: the state dir (``/var/lib/cake-cluster``, or ``$CAKE_CLUSTER_STATE_DIR``) holds
what one cluster needs at run time and is removed by ``down`` except ``engine/``; the cache
(``${XDG_CACHE_HOME:-~/.cache}/cake/cluster``) holds the built binaries, one folder per
component and version, and is never removed by the tooling.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from cake_devtools.cluster.errors import ClusterError

#: The sandbox ("pause") image tag kubeadm 1.34 expects and the version of our static build.
PAUSE_VERSION = "3.10.1"
PAUSE_IMAGE = f"registry.k8s.io/pause:{PAUSE_VERSION}"
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
CRI_ENDPOINT = f"unix://{CONTAINERD_SOCKET}"

#: Debian packages the engine and the node need (``mmdebstrap`` builds base images).
ENGINE_PACKAGES = (
    "containerd",
    "runc",
    "docker.io",
    "containernetworking-plugins",
    "iptables",
    "conntrack",
    "iproute2",
    "mmdebstrap",
)
#: What building the static ``pause`` binary needs.
BUILD_PACKAGES = ("gcc", "libc6-dev")

#: A PATH for the daemons that finds Debian's sbin tools whatever the caller's PATH is.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def repo_root() -> Path:
    """The checkout this package is installed from (it holds ``tools/cluster``)."""
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for parent in (start, *start.parents):
            if (parent / "tools" / "cluster" / "kubernetes" / "go.mod").is_file():
                return parent
    raise ClusterError("cannot find the Cake checkout (no tools/cluster/kubernetes/go.mod)")


def default_state_dir() -> Path:
    return Path(os.environ.get("CAKE_CLUSTER_STATE_DIR") or "/var/lib/cake-cluster")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cake" / "cluster"


def go_mod_version(go_mod: str, module: str) -> str:
    """The version ``go.mod`` text requires of ``module`` (``require`` line or block)."""
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)", go_mod, re.MULTILINE)
    if match is None:
        raise ClusterError(f"go.mod does not require {module}")
    return match.group(1)


@dataclass(frozen=True)
class Versions:
    kubernetes: str
    etcd: str
    coredns: str
    pause: str = PAUSE_VERSION

    @classmethod
    def from_sources(cls, sources: Path) -> Versions:
        """Read the versions from the wrapper modules in ``tools/cluster``."""

        def required(folder: str, module: str) -> str:
            return go_mod_version((sources / folder / "go.mod").read_text(), module)

        return cls(
            kubernetes=required("kubernetes", "k8s.io/kubernetes"),
            etcd=required("etcd", "go.etcd.io/etcd/server/v3"),
            coredns=required("coredns", "github.com/coredns/coredns"),
        )

    @property
    def coredns_image(self) -> str:
        return f"registry.k8s.io/coredns/coredns:{self.coredns}"


@dataclass(frozen=True)
class Layout:
    """Paths of the cluster's state; nothing is created until a step needs it."""

    state: Path
    cache: Path

    @classmethod
    def default(cls) -> Layout:
        return cls(state=default_state_dir(), cache=default_cache_dir())

    # --- engine (containerd + dockerd): kept by `down`, removed by `down --engine` ----------
    @property
    def engine_dir(self) -> Path:
        return self.state / "engine"

    def engine_log(self, name: str) -> Path:
        return self.engine_dir / "logs" / f"{name}.log"

    def engine_pid(self, name: str) -> Path:
        return self.engine_dir / "pids" / f"{name}.json"

    # --- the node: removed by `down` --------------------------------------------------------
    @property
    def node_dir(self) -> Path:
        return self.state / "node"

    def log(self, name: str) -> Path:
        return self.node_dir / "logs" / f"{name}.log"

    def pid(self, name: str) -> Path:
        return self.node_dir / "pids" / f"{name}.json"

    @property
    def kubeadm_config(self) -> Path:
        return self.node_dir / "kubeadm.yaml"

    @property
    def kube_proxy_config(self) -> Path:
        return self.node_dir / "kube-proxy.yaml"

    @property
    def volumes_dir(self) -> Path:
        return self.node_dir / "volumes"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.state / "admin.conf"

    # --- build cache -------------------------------------------------------------------------
    def binaries(self, component: str, version: str) -> Path:
        return self.cache / f"{component}-{version}"
