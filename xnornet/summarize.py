"""Summarize training logs (log.jsonl): final-epoch and best-epoch test accuracy per run.

    python -m xnornet.summarize MNIST/logs/*.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List

from .cli import ArgumentParser, UserError, run_cli
from .metrics import read_run_log


def summarize_log(path: Path) -> Dict[str, Any]:
    """Arch, epochs, final and best test accuracy, wall time and commits of the run in one log
    (its last run, when a log holds several: see :func:`xnornet.metrics.read_run_log`)."""
    headers, records = read_run_log(path)
    header = headers[0] if headers else {}
    epochs = [r for r in records if isinstance(r.get("test_acc"), (int, float))]
    if not epochs:
        raise UserError(f"{path} holds no epoch record with a test accuracy")
    best = max(epochs, key=lambda r: r["test_acc"])
    args = header.get("args") or {}
    return {
        "log": str(path),
        "arch": header.get("arch") or args.get("arch") or "?",
        "seed": args.get("seed"),
        "epochs": epochs[-1]["epoch"],
        "final_acc": epochs[-1]["test_acc"],
        "best_acc": best["test_acc"],
        "best_epoch": best["epoch"],
        "hours": sum(r.get("seconds", 0.0) for r in epochs) / 3600,
        "commits": sorted({h.get("git_commit") or "?" for h in headers} or {"?"}),
        "hardware": (header.get("hardware") or {}).get("gpu") or (header.get("hardware") or {}).get("cpu"),
    }


def run_name(path: Path) -> str:
    """A log's file stem, or its folder's name for a run folder's ``log.jsonl``."""
    return path.parent.name if path.name == "log.jsonl" else path.stem


def main(args: argparse.Namespace) -> None:
    rows: List[Dict[str, Any]] = [summarize_log(Path(p)) for p in args.logs]
    print("| run | arch | seed | epochs | final % | best % (epoch) | hours | commit |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {run_name(Path(row['log']))} | {row['arch']} | {row['seed']} | {row['epochs']} | {row['final_acc']:.2f} | "
              f"{row['best_acc']:.2f} ({row['best_epoch']}) | {row['hours']:.2f} | {', '.join(c[:12] for c in row['commits'])} |")
    by_arch: Dict[str, List[Dict[str, Any]]] = {}
    for row in rows:
        by_arch.setdefault(row["arch"], []).append(row)
    for arch, group in by_arch.items():
        if len(group) > 1:
            finals = [r["final_acc"] for r in group]
            bests = [r["best_acc"] for r in group]
            print(f"{arch}: {len(group)} runs, final mean {statistics.mean(finals):.2f} "
                  f"(sd {statistics.stdev(finals):.2f}), best mean {statistics.mean(bests):.2f}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m xnornet.summarize", description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", help="log.jsonl files written by a recipe")
    return parser


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args(sys.argv[1:]))
