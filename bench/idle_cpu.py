"""CPU each component of a running stack burns while nothing is asked of it.

    uv run --frozen python bench/idle_cpu.py [--profile dev] [--seconds 30]

Samples ``/proc/<pid>/stat`` (user + system time of every process of each component, as
``make bench`` does per scenario) at the start and the end of the window and prints each
component's share of one core. Idle burn is paid whatever the load: at N logins a second,
a component idling at P % of a core adds 10 P / N milliseconds to every login. Other load on
the machine skews it (more context switches, colder caches): the load average is printed at
start and end; compare windows taken one after the other.
"""

from __future__ import annotations

import argparse
import os
import time

from benchlib import sample_server_cpu
from cake_devtools.stack import Stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="dev", choices=("dev", "test"))
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    stack = Stack(args.profile, echo=None)
    before = sample_server_cpu(stack)
    time.sleep(args.seconds)
    after = sample_server_cpu(stack)
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    print(
        f"idle for {args.seconds:.0f} s, load average {before.load_average:.2f} -> "
        f"{after.load_average:.2f}; % of one core:"
    )
    total = 0.0
    for name, now in sorted(after.ticks.items()):
        earlier = before.ticks.get(name, {})
        used = sum(ticks - earlier.get(pid, 0) for pid, ticks in now.items()) / ticks_per_second
        total += used
        print(f"  {name:14s} {100 * used / args.seconds:5.1f}")
    print(f"  {'all':14s} {100 * total / args.seconds:5.1f}")


if __name__ == "__main__":
    main()
