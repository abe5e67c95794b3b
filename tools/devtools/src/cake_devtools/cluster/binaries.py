"""Build-or-reuse the cluster's binaries from the wrapper modules in ``tools/cluster``.

Each component is built once per version into ``<cache>/<component>-<version>/`` (first into
a ``.partial`` sibling, renamed when complete, so an interrupted build is never mistaken for
a finished one). Go builds are static (``CGO_ENABLED=0``), ``-trimpath`` and stripped, and use
only what ``go.mod``/``go.sum`` pin (``-mod=readonly``).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cake_devtools.cluster.errors import ClusterError
from cake_devtools.cluster.layout import Layout, Versions
from cake_devtools.cluster.system import daemon_env, run

KUBERNETES_COMMANDS = (
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubeadm",
)
#: The packages that carry version information set at link time (what `kubeadm version`,
#: the API server's /version and the node's kubeletVersion report).
_VERSION_PACKAGES = ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
#: A Go build of all of Kubernetes needs about 2 GB and a long time on 2 cores.
BUILD_TIMEOUT = 3600.0


def kubernetes_ldflags(version: str, build_date: str = "1970-01-01T00:00:00Z") -> str:
    """``-ldflags`` for the Kubernetes commands: stripped, with the release's version.

    Without the version, kubeadm and the kubelet would report ``v0.0.0-master`` and kubeadm
    would refuse the control plane version it is asked to configure.
    """
    major, minor = version.lstrip("v").split(".")[:2]
    flags = ["-s", "-w"]
    for package in _VERSION_PACKAGES:
        flags += [
            f"-X {package}.gitVersion={version}",
            f"-X {package}.gitMajor={major}",
            f"-X {package}.gitMinor={minor}",
            f"-X {package}.gitTreeState=clean",
            f"-X {package}.buildDate={build_date}",
        ]
    return " ".join(flags)


def go_build_argv(go: str, output_dir: Path, packages: list[str], ldflags: str) -> list[str]:
    return [
        go,
        "build",
        "-mod=readonly",
        "-trimpath",
        f"-ldflags={ldflags}",
        "-o",
        f"{output_dir}/",
        *packages,
    ]


def go_env() -> dict[str, str]:
    return daemon_env({"CGO_ENABLED": "0", "GOFLAGS": "", "GOTOOLCHAIN": "local"})


def pause_build_argv(gcc: str, source: Path, output: Path, version: str) -> list[str]:
    return [
        gcc,
        "-static",
        "-Os",
        "-s",
        f'-DPAUSE_VERSION="{version}"',
        "-o",
        str(output),
        str(source),
    ]


@dataclass(frozen=True)
class Component:
    name: str
    version: str
    outputs: tuple[str, ...]
    build: Callable[[Path], None]


@dataclass(frozen=True)
class Binaries:
    """Where each built binary is."""

    kubernetes: Path
    etcd: Path
    coredns: Path
    pause: Path
    cri_reset: Path

    def k8s(self, command: str) -> Path:
        return self.kubernetes / command

    @property
    def dirs(self) -> tuple[Path, ...]:
        return (self.kubernetes, self.etcd, self.coredns, self.pause, self.cri_reset)


class Builder:
    def __init__(self, layout: Layout, sources: Path, versions: Versions) -> None:
        self.layout = layout
        self.sources = sources
        self.versions = versions

    def components(self) -> list[Component]:
        v = self.versions
        return [
            Component("pause", v.pause, ("pause",), self._build_pause),
            Component("etcd", v.etcd, ("etcd",), self._go("etcd", ["."], "-s -w")),
            Component(
                "coredns",
                v.coredns,
                ("coredns",),
                self._go("coredns", ["github.com/coredns/coredns"], "-s -w"),
            ),
            # Our CRI client for `down` (crictl cannot be installed here), built from the
            # Kubernetes module with its k8s.io/cri-client.
            Component(
                "cri-reset",
                v.kubernetes,
                ("cri-reset",),
                self._go("kubernetes", ["./cmd/cri-reset"], "-s -w"),
            ),
            Component(
                "kubernetes",
                v.kubernetes,
                KUBERNETES_COMMANDS,
                self._go(
                    "kubernetes",
                    [f"k8s.io/kubernetes/cmd/{name}" for name in KUBERNETES_COMMANDS],
                    kubernetes_ldflags(v.kubernetes),
                ),
            ),
        ]

    def binaries(self) -> Binaries:
        v = self.versions
        return Binaries(
            kubernetes=self.layout.binaries("kubernetes", v.kubernetes),
            etcd=self.layout.binaries("etcd", v.etcd),
            coredns=self.layout.binaries("coredns", v.coredns),
            pause=self.layout.binaries("pause", v.pause),
            cri_reset=self.layout.binaries("cri-reset", v.kubernetes),
        )

    def missing(self) -> list[Component]:
        return [c for c in self.components() if not self._complete(c)]

    def ensure(self, report: Callable[[str], None] | None = None) -> tuple[Binaries, list[str]]:
        """Build what the cache lacks; return the binaries and one note per build."""
        notes = []
        for component in self.missing():
            target = self.layout.binaries(component.name, component.version)
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            if report:
                report(f"building {component.name} {component.version}")
            began = time.monotonic()
            component.build(partial)
            for output in component.outputs:
                if not (partial / output).is_file():
                    raise ClusterError(f"building {component.name} produced no {output}")
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
            notes.append(f"{component.name} {time.monotonic() - began:.0f}s")
        return self.binaries(), notes

    def _complete(self, component: Component) -> bool:
        target = self.layout.binaries(component.name, component.version)
        return all((target / output).is_file() for output in component.outputs)

    def _go(self, folder: str, packages: list[str], ldflags: str) -> Callable[[Path], None]:
        def build(output_dir: Path) -> None:
            go = shutil.which("go", path=daemon_env()["PATH"] + ":/usr/local/go/bin")
            if go is None:
                raise ClusterError(
                    "Go (1.24 or later) is needed to build the cluster's binaries; "
                    "install it from https://go.dev/dl and put it on PATH"
                )
            run(
                go_build_argv(go, output_dir, packages, ldflags),
                cwd=self.sources / folder,
                env=go_env(),
                timeout=BUILD_TIMEOUT,
            )

        return build

    def _build_pause(self, output_dir: Path) -> None:
        gcc = shutil.which("gcc", path=daemon_env()["PATH"])
        if gcc is None:
            raise ClusterError("gcc not found (apt-get install gcc libc6-dev)")
        source = self.sources / "pause" / "pause.c"
        run(pause_build_argv(gcc, source, output_dir / "pause", self.versions.pause))
