"""cake-cluster: rendered configuration and constructed commands (no daemon, no cluster)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from cake_devtools.cluster import config
from cake_devtools.cluster.binaries import (
    KUBERNETES_COMMANDS,
    go_build_argv,
    kubernetes_ldflags,
    pause_build_argv,
)
from cake_devtools.cluster.cli import _parser
from cake_devtools.cluster.engine import containerd_config
from cake_devtools.cluster.errors import ClusterError
from cake_devtools.cluster.images import coredns_dockerfile, pause_dockerfile
from cake_devtools.cluster.layout import (
    PAUSE_IMAGE,
    Layout,
    Versions,
    go_mod_version,
    repo_root,
)
from cake_devtools.cluster.system import apt_install_command

NODE = config.NodeConfig(kubernetes_version="v1.34.4")
SOURCES = repo_root() / "tools" / "cluster"


# --- versions and the wrapper modules --------------------------------------------------------


def test_versions_come_from_the_wrapper_modules() -> None:
    versions = Versions.from_sources(SOURCES)
    assert re.fullmatch(r"v1\.34\.\d+", versions.kubernetes)
    assert re.fullmatch(r"v3\.6\.\d+", versions.etcd)
    # kubeadm 1.34 deploys CoreDNS v1.12.1 and the pause image 3.10.1.
    assert versions.coredns == "v1.12.1"
    assert versions.coredns_image == "registry.k8s.io/coredns/coredns:v1.12.1"
    assert PAUSE_IMAGE == "registry.k8s.io/pause:3.10.1"


def test_kubernetes_staging_modules_are_pinned_to_the_matching_release() -> None:
    go_mod = (SOURCES / "kubernetes" / "go.mod").read_text()
    minor_patch = go_mod_version(go_mod, "k8s.io/kubernetes").removeprefix("v1.")
    replaces = re.findall(r"^\s*(k8s\.io/\S+) => (k8s\.io/\S+) (v\S+)$", go_mod, re.MULTILINE)
    assert len(replaces) == 31
    for source, target, version in replaces:
        assert source == target
        assert version == f"v0.{minor_patch}"
    for command in KUBERNETES_COMMANDS:
        assert f"tool k8s.io/kubernetes/cmd/{command}\n" in go_mod


@pytest.mark.parametrize("folder", ["kubernetes", "etcd", "coredns"])
def test_every_wrapper_module_commits_its_go_sum(folder: str) -> None:
    assert (SOURCES / folder / "go.sum").stat().st_size > 0


def test_go_mod_version_reads_single_and_block_requires() -> None:
    text = "module x\n\nrequire a.io/b v1.2.3\n\nrequire (\n\tc.io/d v0.1.0 // indirect\n)\n"
    assert go_mod_version(text, "a.io/b") == "v1.2.3"
    assert go_mod_version(text, "c.io/d") == "v0.1.0"
    with pytest.raises(ClusterError):
        go_mod_version(text, "e.io/f")


def test_binaries_are_cached_per_component_and_version(tmp_path: Path) -> None:
    layout = Layout(state=tmp_path / "state", cache=tmp_path / "cache")
    assert layout.binaries("etcd", "v3.6.5") == tmp_path / "cache" / "etcd-v3.6.5"
    assert layout.admin_kubeconfig == tmp_path / "state" / "admin.conf"
    # `down` removes the node dir but not the engine's logs and pid files.
    assert not layout.engine_dir.is_relative_to(layout.node_dir)


# --- build commands ------------------------------------------------------------------------------


def test_kubernetes_ldflags_strip_and_stamp_the_release_version() -> None:
    flags = kubernetes_ldflags("v1.34.4").split(" -X ")
    assert flags[0] == "-s -w"
    assert "k8s.io/component-base/version.gitVersion=v1.34.4" in flags
    assert "k8s.io/component-base/version.gitMajor=1" in flags
    assert "k8s.io/component-base/version.gitMinor=34" in flags
    assert "k8s.io/client-go/pkg/version.gitVersion=v1.34.4" in flags


def test_go_build_is_trimmed_readonly_and_writes_into_a_folder(tmp_path: Path) -> None:
    argv = go_build_argv("/usr/bin/go", tmp_path, ["k8s.io/kubernetes/cmd/kubelet"], "-s -w")
    assert argv[:2] == ["/usr/bin/go", "build"]
    assert {"-trimpath", "-mod=readonly", "-ldflags=-s -w"} <= set(argv)
    assert argv[argv.index("-o") + 1] == f"{tmp_path}/"
    assert argv[-1] == "k8s.io/kubernetes/cmd/kubelet"


def test_pause_is_a_static_stripped_c_binary(tmp_path: Path) -> None:
    argv = pause_build_argv("gcc", SOURCES / "pause" / "pause.c", tmp_path / "pause", "3.10.1")
    assert "-static" in argv and "-s" in argv
    assert '-DPAUSE_VERSION="3.10.1"' in argv
    assert (SOURCES / "pause" / "pause.c").is_file()


def test_node_images_are_from_scratch_without_syntax_lines() -> None:
    for dockerfile in (pause_dockerfile(), coredns_dockerfile()):
        assert dockerfile.startswith("FROM scratch\n")
        assert "# syntax" not in dockerfile
    assert 'ENTRYPOINT ["/pause"]' in pause_dockerfile()
    assert 'ENTRYPOINT ["/coredns"]' in coredns_dockerfile()


def test_apt_installs_quietly_without_recommends() -> None:
    assert apt_install_command(["containerd", "runc"]) == [
        "apt-get",
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        "containerd",
        "runc",
    ]


# --- containerd --------------------------------------------------------------------------------


def test_containerd_config_has_what_this_machine_kind_needs() -> None:
    parsed = tomllib.loads(containerd_config())
    assert parsed["version"] == 2
    cri = parsed["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["restrict_oom_score_adj"] is True
    assert cri["sandbox_image"] == PAUSE_IMAGE
    runc = cri["containerd"]["runtimes"]["runc"]
    assert runc["runtime_type"] == "io.containerd.runc.v2"
    assert runc["options"]["SystemdCgroup"] is False
    assert cri["containerd"]["default_runtime_name"] == "runc"
    assert cri["cni"] == {"bin_dir": "/usr/lib/cni", "conf_dir": "/etc/cni/net.d"}


# --- kubeadm, kubelet, kube-proxy, CNI ----------------------------------------------------------


def _kubeadm_docs(tmp_path: Path) -> dict[str, dict[str, object]]:
    text = config.kubeadm_config(
        NODE, resolv_conf=tmp_path / "resolv.conf", static_pods=tmp_path / "static"
    )
    return {doc["kind"]: doc for doc in yaml.safe_load_all(text)}


def test_kubeadm_config_puts_the_api_on_its_own_link_without_taints(tmp_path: Path) -> None:
    docs = _kubeadm_docs(tmp_path)
    init: dict[str, object] = docs["InitConfiguration"]
    assert init["apiVersion"] == "kubeadm.k8s.io/v1beta4"
    assert init["localAPIEndpoint"] == {"advertiseAddress": "10.250.0.1", "bindPort": 6443}
    registration = init["nodeRegistration"]
    assert isinstance(registration, dict)
    assert registration["taints"] == []
    assert registration["criSocket"] == "unix:///run/containerd/containerd.sock"
    assert registration["name"] == "cake-node"
    cluster = docs["ClusterConfiguration"]
    assert cluster["kubernetesVersion"] == "v1.34.4"
    assert cluster["controlPlaneEndpoint"] == "10.250.0.1:6443"
    assert cluster["networking"] == {
        "podSubnet": "10.244.0.0/16",
        "serviceSubnet": "10.96.0.0/12",
        "dnsDomain": "cluster.local",
    }


def test_kubelet_configuration_uses_cgroupfs_and_no_static_pods(tmp_path: Path) -> None:
    kubelet = _kubeadm_docs(tmp_path)["KubeletConfiguration"]
    assert kubelet["cgroupDriver"] == "cgroupfs"
    assert kubelet["failSwapOn"] is False
    assert kubelet["staticPodPath"] == str(tmp_path / "static")
    assert kubelet["resolvConf"] == str(tmp_path / "resolv.conf")
    assert kubelet["imageGCHighThresholdPercent"] == 100


def test_pods_get_no_upstream_dns_beyond_the_cluster() -> None:
    assert config.resolv_conf(NODE).splitlines()[-1] == "nameserver 10.250.0.1"


def test_kube_proxy_runs_iptables_without_touching_conntrack_or_oom(tmp_path: Path) -> None:
    proxy = yaml.safe_load(config.kube_proxy_config(NODE, kubeconfig=tmp_path / "kp.conf"))
    assert proxy["kind"] == "KubeProxyConfiguration"
    assert proxy["mode"] == "iptables"
    assert proxy["oomScoreAdj"] == 0
    assert proxy["conntrack"]["maxPerCore"] == 0
    assert proxy["clusterCIDR"] == "10.244.0.0/16"
    assert proxy["nodePortAddresses"] == ["primary"]
    assert proxy["hostnameOverride"] == "cake-node"
    assert proxy["clientConnection"]["kubeconfig"] == str(tmp_path / "kp.conf")


def test_cni_chain_is_bridge_portmap_firewall() -> None:
    conflist = json.loads(config.cni_conflist(NODE))
    assert [plugin["type"] for plugin in conflist["plugins"]] == ["bridge", "portmap", "firewall"]
    bridge = conflist["plugins"][0]
    assert bridge["bridge"] == "cake-cni0"
    assert bridge["isGateway"] and bridge["ipMasq"] and bridge["hairpinMode"]
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.244.0.0/24"}]]
    assert bridge["ipam"]["routes"] == [{"dst": "0.0.0.0/0"}]
    assert conflist["plugins"][1]["capabilities"] == {"portMappings": True}


MANIFEST = """\
apiVersion: v1
kind: Pod
metadata: {name: kube-scheduler, namespace: kube-system}
spec:
  containers:
  - name: kube-scheduler
    image: registry.k8s.io/kube-scheduler:v1.34.4
    command:
    - kube-scheduler
    - --authentication-kubeconfig=/etc/kubernetes/scheduler.conf
    - --bind-address=127.0.0.1
    - --leader-elect=true
"""


def test_control_plane_commands_come_from_kubeadm_manifests() -> None:
    argv = config.control_plane_argv(MANIFEST, Path("/cache/kubernetes/kube-scheduler"))
    assert argv == [
        "/cache/kubernetes/kube-scheduler",
        "--authentication-kubeconfig=/etc/kubernetes/scheduler.conf",
        "--bind-address=127.0.0.1",
        "--leader-elect=true",
    ]


def test_kubelet_flags_keep_kubeadms_and_add_ours() -> None:
    env = (
        'KUBELET_KUBEADM_ARGS="--container-runtime-endpoint=unix:///run/containerd/containerd.sock'
        ' --node-ip=10.0.0.9 --pod-infra-container-image=registry.k8s.io/pause:3.10.1"\n'
    )
    flags = config.kubeadm_flags(env)
    assert flags[0] == "--container-runtime-endpoint=unix:///run/containerd/containerd.sock"
    assert len(flags) == 3
    assert config.kubeadm_flags("") == []
    argv = config.kubelet_argv(Path("/bin/kubelet"), flags, NODE)
    assert argv[0] == "/bin/kubelet"
    assert "--oom-score-adj=0" in argv
    assert "--node-ip=10.250.0.1" in argv and "--node-ip=10.0.0.9" not in argv
    assert "--hostname-override=cake-node" in argv
    assert "--config=/var/lib/kubelet/config.yaml" in argv
    assert "--kubeconfig=/etc/kubernetes/kubelet.conf" in argv


def test_cluster_objects_bind_the_host_processes_and_default_the_storage_class() -> None:
    docs = list(yaml.safe_load_all(config.cluster_manifests()))
    bindings = {
        doc["subjects"][0]["name"]: doc["roleRef"]["name"]
        for doc in docs
        if doc["kind"] == "ClusterRoleBinding"
    }
    assert bindings == {
        "system:kube-proxy": "system:node-proxier",
        "cake:hostpath-provisioner": "system:persistent-volume-provisioner",
    }
    (storage_class,) = [doc for doc in docs if doc["kind"] == "StorageClass"]
    annotations = storage_class["metadata"]["annotations"]
    assert annotations["storageclass.kubernetes.io/is-default-class"] == "true"
    assert storage_class["provisioner"] == config.PROVISIONER
    assert storage_class["volumeBindingMode"] == "WaitForFirstConsumer"


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_commands() -> None:
    parser = _parser()
    assert parser.parse_args(["up"]).command == "up"
    assert parser.parse_args(["down", "--engine"]).engine is True
    assert parser.parse_args(["down"]).engine is False
    assert parser.parse_args(["engine"]).command == "engine"
    assert parser.parse_args(["status"]).command == "status"
    with pytest.raises(SystemExit):
        parser.parse_args([])


def test_each_component_has_its_own_cache_folder(tmp_path: Path) -> None:
    from cake_devtools.cluster.binaries import Builder

    layout = Layout(state=tmp_path / "state", cache=tmp_path / "cache")
    builder = Builder(layout, SOURCES, Versions.from_sources(SOURCES))
    names = [component.name for component in builder.components()]
    assert names == ["pause", "etcd", "coredns", "cri-reset", "kubernetes"]
    binaries = builder.binaries()
    assert len(set(binaries.dirs)) == 5
    assert all(folder.parent == tmp_path / "cache" for folder in binaries.dirs)
    assert builder.missing() and [c.name for c in builder.missing()] == names
