"""``cake-cluster engine|up|down|status``: a real single-node Kubernetes on this machine."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from cake_devtools.cluster.binaries import Builder
from cake_devtools.cluster.config import NodeConfig
from cake_devtools.cluster.engine import Engine, containerd_ready
from cake_devtools.cluster.errors import ClusterError
from cake_devtools.cluster.images import (
    NodeImage,
    coredns_dockerfile,
    ensure_images,
    pause_dockerfile,
)
from cake_devtools.cluster.layout import (
    BUILD_PACKAGES,
    PAUSE_IMAGE,
    Layout,
    Versions,
    repo_root,
)
from cake_devtools.cluster.node import DAEMONS, Node
from cake_devtools.cluster.system import (
    Progress,
    apt_install,
    pids_named,
    require_root,
    rss_mib,
)
from cake_devtools.cluster.teardown import Teardown
from cake_devtools.stack import process


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cake-cluster",
        description=(
            "A real single-node Kubernetes of host processes on this machine "
            "(state in /var/lib/cake-cluster, binaries cached in ~/.cache/cake/cluster)."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("engine", help="install and start containerd + dockerd (idempotent)")
    sub.add_parser("up", help="engine, binaries, images, then the node; wait until Ready")
    down = sub.add_parser("down", help="tear the node down completely (binaries stay cached)")
    down.add_argument("--engine", action="store_true", help="also stop dockerd and containerd")
    sub.add_parser("status", help="what runs, with memory; exit 1 unless the node is healthy")
    return parser


class Cluster:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.sources = repo_root() / "tools" / "cluster"
        self.versions = Versions.from_sources(self.sources)
        self.builder = Builder(layout, self.sources, self.versions)
        self.node_config = NodeConfig(kubernetes_version=self.versions.kubernetes)
        self.node = Node(layout, self.builder.binaries(), self.node_config)

    def engine(self, progress: Progress) -> None:
        with progress.step("engine") as note:
            note(Engine(self.layout).up())

    def up(self) -> None:
        progress = Progress("up")
        self.engine(progress)
        with progress.step("binaries") as note:
            missing = self.builder.missing()
            if missing:
                names = ", ".join(f"{c.name} {c.version}" for c in missing)
                print(f"{'':<24}building {names} (Kubernetes takes ~10 min cold)", flush=True)
                if any(component.name == "pause" for component in missing):
                    apt_install(BUILD_PACKAGES)
            binaries, built = self.builder.ensure()
            note(("built " + ", ".join(built)) if built else f"cached in {self.layout.cache}")
        with progress.step("images") as note:
            note(
                ensure_images(
                    [
                        NodeImage(PAUSE_IMAGE, binaries.pause / "pause", pause_dockerfile()),
                        NodeImage(
                            self.versions.coredns_image,
                            binaries.coredns / "coredns",
                            coredns_dockerfile(),
                        ),
                    ]
                )
            )
        with progress.step("node") as note:
            healthy = self.node.healthy()
            note("already up and healthy" if healthy else "not up yet: bringing it up")
        if not healthy:
            self.node.up(progress)
        print(
            f"cluster up in {progress.total():.1f}s: node {self.node_config.node_name} Ready, "
            f"Kubernetes {self.versions.kubernetes}",
            flush=True,
        )
        print(f"export KUBECONFIG={self.layout.admin_kubeconfig}")

    def down(self, *, engine: bool) -> None:
        progress = Progress("down")
        teardown = Teardown(self.layout, self.node_config, self.builder.binaries())
        if self.layout.node_dir.exists() and not containerd_ready():
            # A cluster left behind by a stopped machine or session: its pods are still in
            # containerd's records, and only a running containerd removes them (through the
            # CRI, with their networks and mounts), so start the engine first.
            with progress.step("engine") as note:
                note(Engine(self.layout).up())
        for step, action in (
            ("processes", teardown.processes),
            ("containers", teardown.containers),
            ("mounts", teardown.mounts),
            ("links", teardown.links),
            ("iptables", teardown.iptables),
            ("state", teardown.state),
        ):
            with progress.step(step) as note:
                note(action())
        if engine:
            with progress.step("engine") as note:
                note(Engine(self.layout).down())
        print(f"cluster down in {progress.total():.1f}s (binaries stay in {self.layout.cache})")

    def status(self) -> bool:
        rows = []
        total = 0.0
        for name, pids in Engine(self.layout).status().items():
            for pid in pids:
                rows.append((name, str(pid), rss_mib(pid), "running"))
        for daemon in self.node.daemons():
            record = process.read_record(self.layout.pid(daemon.name))
            if record is None:
                rows.append((daemon.name, "-", 0.0, "stopped"))
            else:
                health = "healthy" if daemon.probe() else "UNHEALTHY"
                rows.append((daemon.name, str(record.pid), rss_mib(record.pid), health))
        for pid in pids_named("coredns"):
            rows.append(("coredns (pod)", str(pid), rss_mib(pid), "running"))
        print(f"{'process':<26}{'pid':<9}{'rss MiB':>8}  state")
        for name, shown_pid, rss, state in rows:
            total += rss
            print(f"{name:<26}{shown_pid:<9}{rss:>8.0f}  {state}")
        print(f"{'total':<35}{total:>8.0f}")
        running = all(process.read_record(self.layout.pid(name)) is not None for name in DAEMONS)
        ready = running and self.node.node_ready()
        state = "Ready" if ready else ("not Ready" if running else "down")
        print(f"node {self.node_config.node_name}: {state}")
        if self.layout.admin_kubeconfig.exists():
            print(f"export KUBECONFIG={self.layout.admin_kubeconfig}")
        return ready


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    layout = Layout.default()
    try:
        require_root()
        if args.command == "engine":
            progress = Progress("engine")
            with progress.step("engine") as note:
                note(Engine(layout).up())
            return 0
        cluster = Cluster(layout)
        if args.command == "up":
            cluster.up()
        elif args.command == "down":
            cluster.down(engine=args.engine)
        else:
            return 0 if cluster.status() else 1
    except (ClusterError, OSError) as exc:
        print(f"cake-cluster {args.command} failed: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0
