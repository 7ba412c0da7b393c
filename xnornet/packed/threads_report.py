"""What a parallel loop costs to start, and where a packed block's time goes, on two threads.

    python -m xnornet.packed.threads_report --out CIFAR_10/logs/packed_threads.jsonl

1. For numba's OpenMP and work-queue threading layers, each in a fresh process:
   the median time of a parallel loop over two nearly empty iterations, and of
   NIN's 3x3 float convolution at batch 1, alone and right after such a loop
   (does the other pool get in its way?).
2. With the engine's own layer: NIN's 5x5 and 3x3 blocks (random weights) at
   batch 1 and 64: the whole packed block, and its XNOR kernel's serial and
   parallel builds called directly with the block's arguments.
3. Every kernel call of LeNet-5, NIN and AlexNet (random weights) at batch 1
   and 4, where the two builds cross: its work and the times of its serial and
   parallel builds, the measurements behind the kernels' ``serial_below``
   thresholds.

One JSON line per measurement after a run header (commit, CPU, load average).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numba
import numpy as np
import torch
import torch.nn.functional as F

from ..cli import ArgumentParser, positive_int, run_cli, setup_logging
from ..metrics import REPO_ROOT, MetricsLog, run_header
from . import kernels
from .archs import build_arch
from .benchmark import NETWORKS, block_inputs, build_networks, run_fresh_process
from .engine import PackedBinConv2d, pack_model

LOG = logging.getLogger("xnornet")
LAYERS = ("omp", "workqueue")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m xnornet.packed.threads_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=400, metavar="N", help="timed calls per figure")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "CIFAR_10" / "logs" / "packed_threads.jsonl",
                        metavar="FILE", help="JSON-lines log to append to")
    parser.add_argument("--loop-only", choices=LAYERS, default=None, help=argparse.SUPPRESS)  # the child processes
    return parser


def medians_us(runs: Dict[str, Callable[[], Any]], repeats: int) -> Dict[str, float]:
    """Median wall time of each run in microseconds, the runs taking turns call by call
    (this VM's speed drifts; taking turns spreads a slow stretch over all of them)."""
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: 1e6 * statistics.median(values) for name, values in times.items()}


def recorded_calls(module: torch.nn.Module, x: Any) -> List[Tuple[kernels.Kernel, tuple, Optional[int]]]:
    """The kernel calls (kernel, arguments, work) that ``module(x)`` makes, in order; they also run.
    A block's single :func:`~xnornet.packed.kernels.xnor_block` call is listed as the calls of the
    stand-alone kernels for its steps (packing, merging rows, the convolution)."""
    calls: List[Tuple[kernels.Kernel, tuple, Optional[int]]] = []
    original = kernels.Kernel.__call__

    def record(kernel: kernels.Kernel, *args: Any, work: Optional[int] = None, threads: Optional[int] = None,
               parallel: Optional[bool] = None) -> None:
        original(kernel, *args, work=work, threads=threads, parallel=parallel)
        calls.extend(kernels.block_steps(*args) if kernel is kernels.xnor_block else [(kernel, args, work)])

    kernels.Kernel.__call__ = record  # type: ignore[method-assign]  # restored below, whatever happens
    try:
        with torch.no_grad():
            module(x)
    finally:
        kernels.Kernel.__call__ = original  # type: ignore[method-assign]
    return calls


def with_rows(kernel: kernels.Kernel, args: tuple, parallel: bool) -> tuple:
    """The arguments of a recorded call, the rows per job (and the XNOR kernel's workers) set as
    the engine would for that build."""
    if kernel is kernels.xnor_conv:  # rows per job and workers
        return args[:-2] + (kernels.rows_per_job(args[9].shape[1], args[0].shape[0], 2, parallel), 2 if parallel else 1)
    if kernel is kernels.pack_nchw:
        return args[:-1] + (kernels.rows_per_job(args[0].shape[2], args[0].shape[0], 2, parallel,
                                                 kernels.PACK_JOBS_PER_THREAD),)
    return args


def _nearly_empty(values):  # pragma: no cover  (compiled)
    for i in numba.prange(values.size):
        values[i] += 1.0


def loop_costs(layer: str, repeats: int) -> Dict[str, Any]:
    """Part 1 in this process (its threading layer chosen by NUMBA_THREADING_LAYER)."""
    loop = numba.njit(parallel=True)(_nearly_empty)
    values = np.zeros(2)
    x, weight = torch.randn(1, 192, 8, 8), torch.randn(192, 192, 3, 3)
    with torch.no_grad():
        conv = lambda: F.conv2d(x, weight, padding=1)  # noqa: E731
        loop(values)
        figures = medians_us({"empty_loop_us": lambda: loop(values), "float_conv_alone_us": conv}, repeats)
        # Right after a loop: the loop untimed, then the convolution timed.
        after = []
        for _ in range(repeats):
            loop(values)
            start = time.perf_counter()
            conv()
            after.append(time.perf_counter() - start)
    return {"event": "loop", "layer_asked": layer, "layer": kernels.threading_layer(), **figures,
            "float_conv_after_loop_us": 1e6 * statistics.median(after)}


def block_costs(repeats: int) -> List[Dict[str, Any]]:
    """Part 2: NIN's 5x5 and 3x3 blocks, whole and their XNOR kernel's two builds."""
    packed = pack_model(build_networks("nin")[0])
    records = []
    for batch in (1, 64):
        inputs = block_inputs(packed, PackedBinConv2d, torch.randn(batch, 3, 32, 32))
        for name in ("xnor.6", "xnor.10"):
            block, x = packed.get_submodule(name), inputs[name]
            kernel, args, _ = next(call for call in recorded_calls(block, x) if call[0] is kernels.xnor_conv)
            serial_args, parallel_args = with_rows(kernel, args, False), with_rows(kernel, args, True)
            count = repeats if batch == 1 else max(3, repeats // 40)
            with torch.no_grad():
                figures = medians_us({"block_us": lambda: block(x),
                                      "kernel_serial_us": lambda: kernels.xnor_conv.serial(*serial_args),
                                      "kernel_parallel_us": lambda: kernels.xnor_conv.parallel(*parallel_args)}, count)
            records.append({"event": "block", "layer": name, "batch": batch, "threads": 2, **figures,
                            "threading_layer": kernels.threading_layer()})
            LOG.info("%s", records[-1])
    return records


def crossover(repeats: int) -> List[Dict[str, Any]]:
    """Part 3: serial against parallel build of every kernel call of the three networks."""
    records = []
    for arch, (_, input_shape, _) in NETWORKS.items():
        packed = pack_model(build_arch(arch).eval())
        for batch in (1, 4):
            for kernel, args, work in recorded_calls(packed, torch.randn(batch, *input_shape)):
                serial_args, parallel_args = with_rows(kernel, args, False), with_rows(kernel, args, True)
                count = max(3, min(repeats, int(2e8 // max(work or 1, 1))))
                figures = medians_us({"serial_us": lambda: kernel.serial(*serial_args),
                                      "parallel_us": lambda: kernel.parallel(*parallel_args)}, count)
                records.append({"event": "crossover", "arch": arch, "batch": batch,
                                "kernel": kernel.serial.__name__.removesuffix("_serial").lstrip("_"),
                                "work": work, "serial_below": kernel.serial_below, **figures})
    return records


def main(args: argparse.Namespace) -> List[Dict[str, Any]]:
    torch.set_num_threads(2)  # every part measures two threads
    kernels.sync_threads(2)
    log = MetricsLog(args.out)
    if args.loop_only:
        record = loop_costs(args.loop_only, args.repeats)
        log.write(record)
        return [record]
    log.write(run_header(vars(args), load_average=os.getloadavg()))
    start = args.out.stat().st_size
    for layer in LAYERS:
        run_fresh_process("xnornet.packed.threads_report",
                          ["--loop-only", layer, "--repeats", str(args.repeats), "--out", str(args.out)],
                          {"NUMBA_THREADING_LAYER": layer, "OMP_NUM_THREADS": "2"}, f"the {layer} layer")
    with open(args.out, encoding="utf-8") as handle:
        handle.seek(start)
        records = [json.loads(line) for line in handle]
    records += block_costs(args.repeats) + crossover(args.repeats)
    for record in records[len(LAYERS):]:
        log.write(record)
    log.write({"event": "end", "load_average": os.getloadavg()})
    for record in records:
        if record["event"] != "crossover":
            print(json.dumps(record))
    crossings = sorted({(r["kernel"], r["work"], r["parallel_us"] < r["serial_us"])
                        for r in records if r["event"] == "crossover"})
    for name in sorted({kernel for kernel, _, _ in crossings}):
        line = ", ".join(f"{work}{'+' if faster else '-'}" for kernel, work, faster in crossings if kernel == name)
        print(f"{name}, work per call (+: parallel faster, -: serial faster): {line}")
    return records


if __name__ == "__main__":
    setup_logging()
    run_cli(main, get_args_parser().parse_args(sys.argv[1:]))
