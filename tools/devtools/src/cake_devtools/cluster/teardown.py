"""Tear the node down to nothing: processes, pods' containers, mounts, network namespaces,
links, iptables chains and state. The engine and the built binaries stay."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import time
from collections.abc import Iterable
from pathlib import Path

from cake_devtools.cluster.binaries import Binaries
from cake_devtools.cluster.config import NodeConfig
from cake_devtools.cluster.engine import containerd_ready, run_ctr
from cake_devtools.cluster.errors import ClusterError
from cake_devtools.cluster.layout import CRI_ENDPOINT, Layout
from cake_devtools.cluster.node import (
    CNI_CONFLIST,
    CNI_IPAM_DIR,
    DAEMONS,
    ETCD_DIR,
    KUBELET_DIR,
    KUBERNETES_DIR,
)
from cake_devtools.cluster.system import run, succeeds
from cake_devtools.stack import process

#: Where pods' mounts live (unmounted deepest first).
MOUNT_PREFIXES = (
    str(KUBELET_DIR) + "/",
    "/run/containerd/io.containerd.grpc.v1.cri/",
    "/run/containerd/io.containerd.runtime.v2.task/k8s.io/",
    "/run/netns/cni-",
)
CHAIN_PREFIXES = ("KUBE-", "CNI-")
#: Seconds between SIGTERM and SIGKILL. The API server stops serving at once on SIGTERM but
#: then lingers in its shutdown for tens of seconds; its state is all in etcd.
STOP_GRACE = {"kube-apiserver": 3.0}


def mounts_to_unmount(mountinfo: str, prefixes: Iterable[str] = MOUNT_PREFIXES) -> list[str]:
    """Mount points under ``prefixes`` from ``/proc/self/mountinfo``, deepest first."""
    points = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        if any(point.startswith(prefix) for prefix in prefixes):
            points.append(point)
    return sorted(set(points), key=lambda p: (-p.count("/"), p))


def _ours(chain: str) -> bool:
    return chain.startswith(CHAIN_PREFIXES)


def iptables_cleanup(save: str) -> list[list[str]]:
    """Arguments (after ``iptables``) that remove every ``KUBE-*``/``CNI-*`` chain, and the
    rules of other chains that jump to them, from ``iptables-save`` output."""
    table = ""
    deletes: list[list[str]] = []
    flushes: list[list[str]] = []
    removes: list[list[str]] = []
    for line in save.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":"):
            chain = line[1:].split()[0]
            if _ours(chain):
                flushes.append(["-t", table, "-F", chain])
                removes.append(["-t", table, "-X", chain])
        elif line.startswith("-A "):
            words = shlex.split(line)
            chain = words[1]
            if _ours(chain):
                continue  # flushed with its chain
            target = next((words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-j", "-g")), "")
            if _ours(target):
                deletes.append(["-t", table, "-D", chain, *words[2:]])
    return deletes + flushes + removes


def _pids_running_from(folders: Iterable[Path]) -> list[int]:
    roots = [str(folder.resolve()) + "/" for folder in folders if folder.exists()]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            exe = os.readlink(entry / "exe")
        except OSError:
            continue
        if any(exe.startswith(root) for root in roots):
            found.append(int(entry.name))
    return found


def _remove_tree(path: Path) -> None:
    """Remove a folder; one that is a mount point (``/var/lib/kubelet`` may be a bind mount
    onto a real disk, which ``os.path.ismount`` does not see) is emptied and kept."""
    mountinfo = Path("/proc/self/mountinfo").read_text()
    points = {line.split()[4] for line in mountinfo.splitlines() if len(line.split()) > 4}
    if str(path) not in points and not os.path.ismount(path):
        shutil.rmtree(path)
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


class Teardown:
    def __init__(self, layout: Layout, node: NodeConfig, binaries: Binaries) -> None:
        self.layout = layout
        self.node = node
        self.binaries = binaries
        self.binary_dirs = list(binaries.dirs)

    def processes(self) -> str:
        stopped = []
        for name in reversed(DAEMONS):
            record = process.read_record(self.layout.pid(name))
            if record is not None:
                process.terminate(record, grace=STOP_GRACE.get(name, 10))
                stopped.append(name)
            self.layout.pid(name).unlink(missing_ok=True)
        # Strays without a pid file (a lost state dir): anything running our binaries.
        strays = _pids_running_from(self.binary_dirs)
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _pids_running_from(self.binary_dirs) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _pids_running_from(self.binary_dirs):
            raise ClusterError("processes of the cluster's binaries did not stop")
        note = f"stopped {', '.join(stopped)}" if stopped else "none running"
        return note + (f" (+{len(strays)} without pid file)" if strays else "")

    def containers(self) -> str:
        """Remove the pods through the CRI (the runtime then runs each pod's CNI DEL, unmounts
        and forgets it), then whatever is left in the k8s.io namespace with ctr."""
        if not containerd_ready():
            return "containerd not running"
        notes = []
        cri_reset = self.binaries.cri_reset / "cri-reset"
        if cri_reset.is_file():
            result = run([str(cri_reset), f"--endpoint={CRI_ENDPOINT}"], check=False, timeout=180)
            summary = result.stdout.strip().splitlines()
            notes.append(summary[-1] if summary else f"cri-reset exited {result.returncode}")
            if result.returncode != 0 and result.stderr.strip():
                notes.append(result.stderr.strip().splitlines()[0])
        tasks = run_ctr("-n", "k8s.io", "tasks", "ls", "-q").split()
        for task in tasks:
            with contextlib.suppress(ClusterError):
                run_ctr("-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", task)
        for task in tasks:
            for _ in range(50):
                with contextlib.suppress(ClusterError):
                    run_ctr("-n", "k8s.io", "tasks", "delete", "-f", task)
                if task not in run_ctr("-n", "k8s.io", "tasks", "ls", "-q").split():
                    break
                time.sleep(0.2)
        containers = run_ctr("-n", "k8s.io", "containers", "ls", "-q").split()
        for container in containers:
            with contextlib.suppress(ClusterError):
                run_ctr("-n", "k8s.io", "containers", "delete", container)
        left = run_ctr("-n", "k8s.io", "containers", "ls", "-q").split()
        if left:
            raise ClusterError(f"containers left in containerd's k8s.io namespace: {left}")
        if tasks or containers:
            notes.append(f"ctr removed {len(tasks)} tasks, {len(containers)} containers")
        return "; ".join(notes) or "no containers"

    def mounts(self) -> str:
        points = mounts_to_unmount(Path("/proc/self/mountinfo").read_text())
        for point in points:
            if not succeeds(["umount", point]):
                run(["umount", "-l", point], check=False)
        left = mounts_to_unmount(Path("/proc/self/mountinfo").read_text())
        if left:
            raise ClusterError(f"still mounted: {left[:5]}")
        netns = sorted(Path("/run/netns").glob("cni-*")) if Path("/run/netns").is_dir() else []
        for path in netns:
            path.unlink(missing_ok=True)
        return f"unmounted {len(points)}, removed {len(netns)} netns"

    def links(self) -> str:
        removed = []
        bridge = self.node.cni_bridge
        if succeeds(["ip", "link", "show", bridge]):
            ports = run(["ip", "-o", "link", "show", "master", bridge]).stdout.splitlines()
            for port in ports:
                name = port.split(":")[1].strip().split("@")[0]
                if succeeds(["ip", "link", "delete", name]):
                    removed.append(name)
        for link in (bridge, self.node.api_link):
            if succeeds(["ip", "link", "show", link]):
                run(["ip", "link", "delete", link])
                removed.append(link)
        return f"deleted {', '.join(removed)}" if removed else "none"

    def iptables(self) -> str:
        counts = []
        for tool in ("iptables", "ip6tables"):
            if shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin") is None:
                continue
            save = run([f"{tool}-save"], check=False).stdout
            commands = iptables_cleanup(save)
            for args in commands:
                run([tool, "-w", *args], check=False)
            left = [c for c in iptables_cleanup(run([f"{tool}-save"], check=False).stdout)]
            if left:
                raise ClusterError(f"{tool}: could not remove {left[:3]}")
            counts.append(f"{tool} {len(commands)}")
        return "removed KUBE-*/CNI-* rules and chains (" + ", ".join(counts) + " commands)"

    def state(self) -> str:
        removed = []
        paths = [
            KUBERNETES_DIR,
            KUBELET_DIR,
            ETCD_DIR,
            CNI_CONFLIST,
            CNI_IPAM_DIR / self.node.cni_network,
            self.layout.node_dir,
            self.layout.admin_kubeconfig,
        ]
        cni_results = Path("/var/lib/cni/results")
        if cni_results.is_dir():
            for network in (self.node.cni_network, "cni-loopback"):
                paths += sorted(cni_results.glob(f"{network}-*"))
        for path in paths:
            if path.is_dir() and not path.is_symlink():
                _remove_tree(path)
                removed.append(str(path))
            elif path.exists() or path.is_symlink():
                path.unlink()
                removed.append(str(path))
        return f"removed {len(removed)} paths" if removed else "nothing left"
