"""Run a command and append its wall time (process start to exit) to a JSON-lines log.

    python benchmarks/time_run.py --log MNIST/logs/cpu_recipe_wall.jsonl -- \\
        python MNIST/main.py --recipe cpu --data DIR --seed 1

The record holds the command, the exit status, the wall seconds, the git commit and the
hardware, so that a "complete run in N minutes" is a measured figure, including the
interpreter start, the data loading and every epoch.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", type=Path, required=True, help="JSON-lines file to append the record to")
    parser.add_argument("--label", default=None, help="a name for the run, stored in the record")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    sys.path.insert(0, str(REPO_ROOT))
    from xnornet.metrics import MetricsLog, git_commit, hardware

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    start = time.perf_counter()
    returncode = subprocess.run(command).returncode
    wall = time.perf_counter() - start
    MetricsLog(args.log).write({"event": "timed_run", "label": args.label, "command": command,
                                "returncode": returncode, "wall_seconds": wall, "started": started,
                                "git_commit": git_commit(), "hardware": hardware()})
    print(f"wall {wall:.1f} s ({wall / 60:.2f} min), exit {returncode}", file=sys.stderr)
    return returncode


if __name__ == "__main__":
    sys.exit(main())
