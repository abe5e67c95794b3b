"""The node's configuration files, rendered from one ``NodeConfig`` (pure functions)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cake_devtools.cluster.layout import CRI_ENDPOINT


@dataclass(frozen=True)
class NodeConfig:
    """Addresses and names of the single node."""

    kubernetes_version: str
    node_name: str = "cake-node"
    cluster_name: str = "cake"
    #: The API server's (and the node's) address, on a bridge link of its own: this machine
    #: kind has no ``dummy`` link type, and eth0's address is not ours to depend on.
    api_link: str = "cake-api"
    api_address: str = "10.250.0.1"
    api_port: int = 6443
    pod_subnet: str = "10.244.0.0/16"
    #: The node's share of ``pod_subnet`` (one node: one /24 on the CNI bridge).
    node_pod_subnet: str = "10.244.0.0/24"
    service_subnet: str = "10.96.0.0/12"
    dns_domain: str = "cluster.local"
    cni_bridge: str = "cake-cni0"
    cni_network: str = "cake"
    extra_sans: tuple[str, ...] = field(default=("127.0.0.1", "localhost"))

    @property
    def api_endpoint(self) -> str:
        return f"{self.api_address}:{self.api_port}"

    @property
    def server_url(self) -> str:
        return f"https://{self.api_endpoint}"


def kubeadm_config(node: NodeConfig, *, resolv_conf: Path, static_pods: Path) -> str:
    """kubeadm v1beta4 InitConfiguration + ClusterConfiguration + KubeletConfiguration.

    The control plane runs as host processes built from the manifests kubeadm writes, so
    nothing here names an image except the ones the node needs (pause, CoreDNS), which are
    built locally under the tags kubeadm expects.
    """
    init: dict[str, Any] = {
        "apiVersion": "kubeadm.k8s.io/v1beta4",
        "kind": "InitConfiguration",
        "localAPIEndpoint": {"advertiseAddress": node.api_address, "bindPort": node.api_port},
        "nodeRegistration": {
            "name": node.node_name,
            "criSocket": CRI_ENDPOINT,
            "taints": [],
            "imagePullPolicy": "Never",
            "kubeletExtraArgs": [{"name": "node-ip", "value": node.api_address}],
        },
    }
    cluster: dict[str, Any] = {
        "apiVersion": "kubeadm.k8s.io/v1beta4",
        "kind": "ClusterConfiguration",
        "clusterName": node.cluster_name,
        "kubernetesVersion": node.kubernetes_version,
        "controlPlaneEndpoint": node.api_endpoint,
        "networking": {
            "podSubnet": node.pod_subnet,
            "serviceSubnet": node.service_subnet,
            "dnsDomain": node.dns_domain,
        },
        "apiServer": {
            "certSANs": [node.api_address, *node.extra_sans],
            # Serve on the cluster's own link only, not on every address of the machine.
            "extraArgs": [{"name": "bind-address", "value": node.api_address}],
        },
        "etcd": {"local": {"dataDir": "/var/lib/etcd"}},
    }
    kubelet: dict[str, Any] = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # No systemd here: cgroupfs, as containerd's runc (SystemdCgroup = false).
        "cgroupDriver": "cgroupfs",
        "failSwapOn": False,
        # The control plane runs as host processes from kubeadm's manifests, not as static
        # pods (they would need images): the kubelet watches an empty folder instead.
        "staticPodPath": str(static_pods),
        "address": node.api_address,
        # Pods resolve through CoreDNS; CoreDNS's upstream is this file (see node.py).
        "resolvConf": str(resolv_conf),
        # A development node on a shared disk: evict only when it is really full, and
        # do not garbage-collect the locally built images (they cannot be pulled again).
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
    }
    return yaml.safe_dump_all([init, cluster, kubelet], sort_keys=False)


def kube_proxy_config(node: NodeConfig, *, kubeconfig: Path) -> str:
    """kube-proxy in iptables mode, with the two settings this machine kind refuses turned off
    (raising ``nf_conntrack_max`` and a negative ``oom_score_adj``)."""
    config: dict[str, Any] = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "iptables",
        "clusterCIDR": node.pod_subnet,
        "hostnameOverride": node.node_name,
        "bindAddress": node.api_address,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # NodePorts on the node address only (10.250.0.1), not on every address of the machine.
        "nodePortAddresses": ["primary"],
        "oomScoreAdj": 0,
        "conntrack": {"maxPerCore": 0, "min": 0},
    }
    return yaml.safe_dump(config, sort_keys=False)


def cni_conflist(node: NodeConfig) -> str:
    """bridge (the pods' gateway, masquerading, hairpin) + portmap (hostPort) + firewall
    (Docker sets the FORWARD policy to DROP; this accepts the pods' traffic)."""
    conflist = {
        "cniVersion": "1.0.0",
        "name": node.cni_network,
        "plugins": [
            {
                "type": "bridge",
                "bridge": node.cni_bridge,
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": node.node_pod_subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
            {"type": "firewall"},
        ],
    }
    return json.dumps(conflist, indent=2) + "\n"


def resolv_conf(node: NodeConfig) -> str:
    """The upstream CoreDNS forwards to: the node's own address, where nothing answers DNS.

    Cluster names are answered by CoreDNS itself; anything else fails at once instead of
    leaving this machine (the cluster talks to nothing but itself).
    """
    return f"# cake-cluster: no upstream DNS; cluster names only\nnameserver {node.api_address}\n"


SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    "net.bridge.bridge-nf-call-iptables": "1",
    "net.bridge.bridge-nf-call-ip6tables": "1",
}


def control_plane_argv(manifest: str, binary: Path) -> list[str]:
    """The command of a kubeadm static pod manifest, to run as a host process with ``binary``."""
    pod = yaml.safe_load(manifest)
    command = [str(arg) for arg in pod["spec"]["containers"][0]["command"]]
    return [str(binary), *command[1:]]


def kubeadm_flags(env_file: str) -> list[str]:
    """The kubelet flags in kubeadm's ``kubeadm-flags.env`` (``KUBELET_KUBEADM_ARGS="..."``)."""
    for line in env_file.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == "KUBELET_KUBEADM_ARGS":
            return shlex.split(value.strip().strip("\"'"))
    return []


def kubelet_argv(binary: Path, kubeadm_args: list[str], node: NodeConfig) -> list[str]:
    """The kubelet as kubeadm's systemd drop-in would start it, plus what this machine needs."""
    wanted = {
        "--kubeconfig": "/etc/kubernetes/kubelet.conf",
        "--config": "/var/lib/kubelet/config.yaml",
        "--node-ip": node.api_address,
        "--hostname-override": node.node_name,
        # A negative oom_score_adj is refused here.
        "--oom-score-adj": "0",
    }
    kept = [arg for arg in kubeadm_args if arg.split("=", 1)[0] not in wanted]
    return [str(binary), *kept, *(f"{flag}={value}" for flag, value in wanted.items())]


STORAGE_CLASS = "cake-hostpath"
PROVISIONER = "cake.dev/hostpath"
#: Users of the kubeconfigs ``kubeadm kubeconfig user`` writes for kube-proxy and the
#: provisioner, bound below to the roles Kubernetes ships for them.
KUBE_PROXY_USER = "system:kube-proxy"
PROVISIONER_USER = "cake:hostpath-provisioner"


def _user_binding(name: str, role: str, user: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }


def cluster_manifests() -> str:
    """What ``up`` applies once the API answers: RBAC for the two host processes that are not
    kubeadm's (kube-proxy, the volume provisioner) and the default StorageClass.

    A claim without a storageClassName gets the default class; WaitForFirstConsumer makes
    the scheduler place the pod first, then the provisioner (provisioner.py) creates a
    hostPath volume for it.
    """
    documents: list[dict[str, Any]] = [
        _user_binding("cake:kube-proxy", "system:node-proxier", KUBE_PROXY_USER),
        _user_binding(
            "cake:hostpath-provisioner", "system:persistent-volume-provisioner", PROVISIONER_USER
        ),
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": STORAGE_CLASS,
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": PROVISIONER,
            "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Delete",
        },
    ]
    return yaml.safe_dump_all(documents, sort_keys=False)
