"""Time NIN's 5x5 and 3x3 packed blocks on two threads, alone and with one core kept busy.

    python -m xnornet.packed.contention --out CIFAR_10/logs/packed_contention.jsonl

On a shared machine a thread can start late or run slow while another process
holds its core. This times each block (the engine as imported: run the file with
``PYTHONPATH`` pointing at another checkout to time that engine) for ``--seconds``
of back-to-back calls, first alone and then with a spinning process pinned to the
last CPU. One JSON line per figure (median milliseconds), after a run header naming
the commit of the engine timed. Linux only (CPU pinning).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

from xnornet.cli import ArgumentParser, UserError, run_cli, setup_logging
from xnornet.metrics import REPO_ROOT, MetricsLog, run_header
from xnornet.packed import kernels
from xnornet.packed.benchmark import block_inputs, build_networks
from xnornet.packed.engine import PackedBinConv2d, pack_model

BLOCKS = ("xnor.6", "xnor.10")  # NIN's 5x5 and 3x3 blocks


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m xnornet.packed.contention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.5, metavar="S", help="timed calls per figure (default: 1.5)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64], metavar="N")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "CIFAR_10" / "logs" / "packed_contention.jsonl",
                        metavar="FILE", help="JSON-lines log to append to")
    return parser


def median_ms(run: Callable[[], Any], seconds: float) -> float:
    """Median wall time of back-to-back calls of ``run`` for ``seconds`` (after one untimed call)."""
    run()
    times: List[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def spinning_process(cpu: int) -> subprocess.Popen:
    """A Python process spinning on ``cpu`` until killed."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    os.sched_setaffinity(spinner.pid, {cpu})
    return spinner


def main(args: argparse.Namespace) -> List[Dict[str, Any]]:
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        raise UserError("contention needs Linux and at least two CPUs (it pins a busy process to one)")
    torch.set_grad_enabled(False)
    torch.set_num_threads(2)
    kernels.sync_threads(2)
    log = MetricsLog(args.out)
    log.write(run_header(vars(args), load_average=os.getloadavg()))
    model = pack_model(build_networks("nin")[0])
    records = []
    for batch in args.batch_sizes:
        inputs = block_inputs(model, PackedBinConv2d, torch.randn(batch, 3, 32, 32))
        for busy in (False, True):
            spinner = spinning_process(max(os.sched_getaffinity(0))) if busy else None
            try:
                for name in BLOCKS:
                    block, x = model.get_submodule(name), inputs[name]
                    records.append({"event": "block", "layer": name, "batch": batch, "threads": 2,
                                    "other_core_busy": busy, "packed_ms": median_ms(lambda: block(x), args.seconds)})
                    log.write(records[-1])
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
    for r in records:
        print(f"{r['layer']:8s} batch {r['batch']:3d} {'busy core' if r['other_core_busy'] else 'alone    '} "
              f"{r['packed_ms']:8.3f} ms")
    return records


if __name__ == "__main__":
    setup_logging()
    run_cli(main, get_args_parser().parse_args(sys.argv[1:]))
