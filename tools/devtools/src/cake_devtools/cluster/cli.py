"""``cake-cluster engine|up|down|status``: a real single-node Kubernetes on this machine."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from cake_devtools.cluster.engine import Engine
from cake_devtools.cluster.errors import ClusterError
from cake_devtools.cluster.layout import Layout
from cake_devtools.cluster.system import Progress, require_root


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cake-cluster",
        description="A single-node Kubernetes cluster of host processes on this machine.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("engine", help="install and start containerd + dockerd (idempotent)")
    return parser


def _engine(layout: Layout) -> None:
    progress = Progress("engine")
    with progress.step("engine") as note:
        note(Engine(layout).up())


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    layout = Layout.default()
    try:
        require_root()
        if args.command == "engine":
            _engine(layout)
    except ClusterError as exc:
        print(f"cake-cluster {args.command} failed: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0
