"""``cake-stack up|down|status [--profile dev|test] [components...]``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cake_devtools.stack.errors import StackError
from cake_devtools.stack.settings import PROFILES
from cake_devtools.stack.stack import COMPONENTS, Stack


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cake-stack",
        description="Run the local Cake stack of real components under .run/<profile>/.",
    )
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument(
        "components",
        nargs="*",
        metavar="component",
        help=f"some of: {', '.join(COMPONENTS)} (default: all)",
    )
    parser.add_argument("--profile", choices=PROFILES, default="dev")
    return parser


def _short(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _print_status(stack: Stack) -> bool:
    """Print one line per component; True if everything that runs is healthy."""
    all_ok = True
    print(f"{'component':<11}{'state':<12}{'health':<10}{'pid':<9}{'address':<22}log")
    for name, status in stack.status().items():
        if status.state.value in ("running", "external"):
            health = "healthy" if status.healthy else "UNHEALTHY"
            all_ok = all_ok and status.healthy
        else:
            health = "-"
        pid = str(status.pid) if status.pid else "-"
        log = _short(status.log_path) if status.log_path else ""
        print(f"{name:<11}{status.state.value:<12}{health:<10}{pid:<9}{status.address:<22}{log}")
        if status.detail:
            print(f"{'':<11}({status.detail})")
    return all_ok


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    components = args.components or None
    try:
        stack = Stack(args.profile)
        if args.command == "up":
            stack.up(components)
        elif args.command == "down":
            stack.down(components)
        else:
            return 0 if _print_status(stack) else 1
    except StackError as exc:
        print(f"cake-stack {args.command} failed: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `cake-stack status | head`: the reader left; not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; components already started keep running (cake-stack down)")
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
