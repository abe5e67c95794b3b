"""``cake-stack up|down|restart|status|logs [--profile dev|test] [components...]``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from cake_devtools.stack.errors import StackError
from cake_devtools.stack.settings import PROFILES
from cake_devtools.stack.stack import COMPONENTS, NAME_WIDTH, Stack


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cake-stack",
        description="Run the local Cake stack of real components under .run/<profile>/.",
    )
    parser.add_argument(
        "command",
        choices=("up", "down", "restart", "status", "logs"),
        help="logs: the last lines of each component's log (-n), or follow them (-f)",
    )
    parser.add_argument(
        "components",
        nargs="*",
        metavar="component",
        help=f"some of: {', '.join(COMPONENTS)} (default: all)",
    )
    parser.add_argument("--profile", choices=PROFILES, default="dev")
    parser.add_argument(
        "-n", "--lines", type=int, default=20, help="logs: lines per component (default 20)"
    )
    parser.add_argument(
        "-f", "--follow", action="store_true", help="logs: keep printing what is appended"
    )
    return parser


def _short(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _print_status(stack: Stack) -> bool:
    """Print one line per component; True if everything that runs is healthy."""
    all_ok = True
    print(f"{'component':<{NAME_WIDTH}}{'state':<12}{'health':<10}{'pid':<9}{'address':<22}log")
    for name, status in stack.status().items():
        if status.state.value in ("running", "external"):
            health = "healthy" if status.healthy else "UNHEALTHY"
            all_ok = all_ok and status.healthy
        else:
            health = "-"
        pid = str(status.pid) if status.pid else "-"
        log = _short(status.log_path) if status.log_path else ""
        print(
            f"{name:<{NAME_WIDTH}}{status.state.value:<12}{health:<10}{pid:<9}{status.address:<22}{log}"
        )
        if status.detail:
            print(f"{'':<{NAME_WIDTH}}({status.detail})")
    return all_ok


def _logs(stack: Stack, components: list[str] | None, *, lines: int, follow: bool) -> int:
    """Hand the log files to ``tail`` (coreutils already names each file, follows appends and
    re-opens a file that a restart replaced: nothing here to rewrite)."""
    paths = [path for path in stack.log_paths(components).values() if path.exists()]
    if not paths:
        print("no log yet for these components (cake-stack up starts them)", file=sys.stderr)
        return 1
    command = ["tail", "-n", str(lines), *(["-F"] if follow else []), *map(str, paths)]
    sys.stdout.flush()
    try:
        return subprocess.run(command, check=False).returncode
    except KeyboardInterrupt:  # the way out of --follow
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    components = args.components or None
    try:
        stack = Stack(args.profile)
        if args.command == "up":
            stack.up(components)
        elif args.command == "down":
            stack.down(components)
        elif args.command == "restart":
            stack.restart(components)
        elif args.command == "logs":
            if args.lines < 0:
                raise StackError(f"--lines must be 0 or more, got {args.lines}")
            return _logs(stack, components, lines=args.lines, follow=args.follow)
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
