"""Time the packed engine against PyTorch float layers of the same shapes, side by side.

    python -m xnornet.packed.benchmark --out CIFAR_10/logs/packed_benchmark.jsonl

For each network (LeNet-5, NIN, AlexNet at 227x227), batch size and thread
count: every binarized block (packed: sign + pack + XNOR-popcount + alpha/bias +
ReLU) against ``F.conv2d``/``F.linear`` with float weights of the same shape
(bias included, no BatchNorm or ReLU: the float side gets the cheaper deal), and
the whole network, packed vs its float counterpart (``nin_float`` etc.: FloatConv2d
blocks, same weights, no sign).
Each figure is the median of timed runs after a warm-up run (which also pays
numba's compilation), float and packed runs taking turns in rounds; in each round
the faster side runs until it has been timed as long as the slower side
(:func:`paired_median_ms`).
Each thread count runs in a process of its own. One JSON line per measurement,
after a run header naming the commit, the CPU and the load average.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import load_file, load_model_state, model_state_from
from ..cli import ArgumentParser, UserError, positive_int, run_cli, setup_logging
from ..layers import BinConv2d
from ..metrics import REPO_ROOT, MetricsLog, run_header
from . import kernels
from .archs import build_arch
from .engine import PackedBinConv2d, pack_model
from .fileformat import save_packed
from .summary import layer_rows

LOG = logging.getLogger("xnornet")

#: arch -> (its float counterpart, input shape without the batch, shipped checkpoint used when it exists)
NETWORKS: Dict[str, Tuple[str, Tuple[int, ...], Optional[str]]] = {
    "LeNet_5": ("LeNet_5_float", (1, 28, 28), "MNIST/models/LeNet_5.pth"),
    "nin": ("nin_float", (3, 32, 32), "CIFAR_10/models/nin.pth"),
    "alexnet": ("alexnet_float", (3, 227, 227), "ImageNet/models/alexnet.pth"),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m xnornet.packed.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(NETWORKS), choices=sorted(NETWORKS))
    parser.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[1, 64], metavar="N")
    parser.add_argument("--threads", nargs="+", type=positive_int, default=[1, 2], metavar="T")
    parser.add_argument("--repeats", type=positive_int, default=21, metavar="N",
                        help="timed runs of the slower side per figure, in 3 rounds (fewer when they take over "
                             "--budget seconds); the faster side runs as long")
    parser.add_argument("--budget", type=float, default=6.0, metavar="S",
                        help="rough seconds allowed per float/packed pair of figures (default: 6)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "CIFAR_10" / "logs" / "packed_benchmark.jsonl",
                        metavar="FILE", help="JSON-lines log to append to")
    return parser


def paired_median_ms(float_run: Callable[[], Any], packed_run: Callable[[], Any], repeats: int,
                     budget: float, rounds: int = 3) -> Tuple[float, float]:
    """Median wall times of ``float_run`` and ``packed_run`` in milliseconds, timed in turns.

    ``rounds`` times, each side runs once untimed (a warm-up, which warms the
    caches for its own weights and, the first time, pays numba's compilation) and
    then about ``repeats / rounds`` timed runs; then the side whose timed runs took
    less time runs again (after a warm-up of its own if the other side ran in between)
    until its timed runs of the round last as long as the other side's. Taking turns
    puts a slow stretch of the machine (this VM's speed drifts by tens of percent)
    on both sides of the ratio, and equal stretches let the ten times faster side
    sample the machine as long as the slower one does, not through a window a tenth
    as long. The warm-up keeps each side from paying for the other's cache misses.
    Each side stops adding runs once its timed runs pass ``budget / 2`` seconds in all
    (after at least 3).
    """
    times: Tuple[List[float], List[float]] = ([], [])
    per_round = max(1, -(-repeats // rounds))
    runs = (float_run, packed_run)

    def timed_runs(side: int, until: Callable[[int, float], bool]) -> float:
        """Time ``runs[side]`` until ``until(count, seconds)`` or the budget; the seconds it took."""
        count, seconds = 0, 0.0
        while not until(count, seconds):
            start = time.perf_counter()
            runs[side]()
            times[side].append(time.perf_counter() - start)
            count, seconds = count + 1, seconds + times[side][-1]
            if len(times[side]) >= 3 and sum(times[side]) > budget / 2:
                break
        return seconds

    for _ in range(rounds):
        spent = []
        for side in (0, 1):
            runs[side]()  # warm-up
            spent.append(timed_runs(side, lambda count, _: count >= per_round))
        shorter = 0 if spent[0] < spent[1] else 1
        if spent[shorter] < spent[1 - shorter]:
            if shorter == 0:
                runs[0]()  # the packed side ran since float's last run
            target = spent[1 - shorter] - spent[shorter]
            timed_runs(shorter, lambda _, seconds: seconds >= target)
    return 1000.0 * statistics.median(times[0]), 1000.0 * statistics.median(times[1])


def build_networks(arch: str) -> Tuple[nn.Module, nn.Module]:
    """The XNOR network (shipped weights when they exist, else random) and its float counterpart.

    The float counterpart (FloatConv2d blocks: BatchNorm -> conv -> ReLU, no sign)
    gets the same weights; it is the end-to-end float baseline.
    """
    model = build_arch(arch).eval()
    shipped = NETWORKS[arch][2]
    if shipped and (REPO_ROOT / shipped).is_file():
        load_model_state(model, model_state_from(load_file(REPO_ROOT / shipped)), shipped)
        LOG.info("%s: weights of %s", arch, shipped)
    else:
        LOG.info("%s: random initialization (no %s)", arch, shipped)
    float_model = build_arch(NETWORKS[arch][0]).eval()
    load_model_state(float_model, model.state_dict(), f"{arch} weights")
    return model, float_model


def block_inputs(model: nn.Module, kind: type, images: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The input each module of type ``kind`` receives when ``model`` runs on ``images``."""
    inputs: Dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, name=name: inputs.__setitem__(name, args[0].clone()))
        for name, module in model.named_modules() if isinstance(module, kind)
    ]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def float_layer(block: BinConv2d) -> Callable[[torch.Tensor], torch.Tensor]:
    """The float conv/linear of a block's shape (its real weights and bias)."""
    layer = block.weight_layer
    if block.Linear:
        return lambda x: F.linear(x.reshape(x.shape[0], -1), layer.weight, layer.bias)
    return lambda x: F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, 1, layer.groups)


def shape_of(block: BinConv2d) -> str:
    if block.Linear:
        return f"linear {block.input_channels}->{block.output_channels}"
    return (f"conv {block.kernel_size}x{block.kernel_size} {block.input_channels}->{block.output_channels}"
            f" s{block.stride} p{block.padding}")


def benchmark_network(arch: str, args: argparse.Namespace, log: MetricsLog) -> List[Dict[str, Any]]:
    model, float_model = build_networks(arch)
    packed = pack_model(model)
    log.write(size_record(arch, model, packed))
    records = []
    for batch in args.batch_sizes:
        images = torch.randn(batch, *NETWORKS[arch][1], generator=torch.Generator().manual_seed(batch))
        float_inputs = block_inputs(model, BinConv2d, images)
        packed_inputs = block_inputs(packed, PackedBinConv2d, images)
        for threads in args.threads:
            torch.set_num_threads(threads)
            kernels.sync_threads(threads)
            with torch.no_grad():
                for name, block in model.named_modules():
                    if not isinstance(block, BinConv2d):
                        continue
                    float_run, packed_block = float_layer(block), packed.get_submodule(name)
                    x_float, x_packed = float_inputs[name], packed_inputs[name]
                    float_ms, packed_ms = paired_median_ms(lambda: float_run(x_float), lambda: packed_block(x_packed),
                                                           args.repeats, args.budget)
                    records.append({"event": "layer", "arch": arch, "layer": name, "shape": shape_of(block),
                                    "input": list(x_float.shape), "batch": batch, "threads": threads,
                                    "float_ms": float_ms, "packed_ms": packed_ms, "speedup": float_ms / packed_ms})
                    log.write(records[-1])
                # The default NCHW input, then channels-last input (faster for both: the first conv in
                # particular); packed blocks return channels-last tensors either way.
                for layer, source in (("(whole network)", images),
                                      ("(whole, NHWC in)", images.contiguous(memory_format=torch.channels_last))):
                    float_ms, packed_ms = paired_median_ms(lambda: float_model(source), lambda: packed(source),
                                                           args.repeats, args.budget)
                    records.append({"event": "network", "arch": arch, "layer": layer, "shape": "",
                                    "input": list(images.shape), "channels_last": source is not images,
                                    "batch": batch, "threads": threads, "float_ms": float_ms,
                                    "packed_ms": packed_ms, "speedup": float_ms / packed_ms})
                    log.write(records[-1])
                    LOG.info("%s %s batch %d threads %d: float %.2f ms, packed %.2f ms (%.1fx)",
                             arch, layer, batch, threads, float_ms, packed_ms, float_ms / packed_ms)
    return records


def size_record(arch: str, model: nn.Module, packed: nn.Module) -> Dict[str, Any]:
    """Bytes of the float32 weights, of the packed tensors and of the ``.xnor`` file."""
    rows = layer_rows(model, packed)
    with tempfile.TemporaryDirectory() as folder:
        file_bytes = save_packed(packed, Path(folder) / "model.xnor", arch=arch)
    float_bytes = sum(row.float_bytes for row in rows)
    binarized = [row for row in rows if row.bits_per_weight == 1]
    record = {"event": "size", "arch": arch, "float32_bytes": float_bytes,
              "packed_tensor_bytes": sum(row.packed_bytes for row in rows), "file_bytes": file_bytes,
              "compression": float_bytes / file_bytes,
              "float_layers_bytes": sum(row.float_bytes for row in rows if row.bits_per_weight == 32),
              "binarized_float32_bytes": sum(row.float_bytes for row in binarized),
              "binarized_packed_bytes": sum(row.packed_bytes for row in binarized)}
    LOG.info("%s: float32 weights %d bytes, .xnor file %d bytes (%.1fx)", arch, float_bytes, file_bytes,
             record["compression"])
    return record


def format_table(records: List[Dict[str, Any]]) -> str:
    """One line per layer: float/packed milliseconds and speed-up for each (batch, threads)."""
    settings = sorted({(r["batch"], r["threads"]) for r in records})
    head = f"{'network':<8} {'layer':<16} {'shape':<28}" + "".join(
        f" | {f'b{b} t{t}: float/packed ms':>29}" for b, t in settings)
    lines = [head, "-" * len(head)]
    rows: Dict[Tuple[str, str], Dict[Tuple[int, int], Dict[str, Any]]] = {}
    for r in records:
        rows.setdefault((r["arch"], r["layer"]), {})[(r["batch"], r["threads"])] = r
    for (arch, layer), cells in rows.items():
        shape = next(iter(cells.values()))["shape"]
        text = f"{arch:<8} {layer:<16} {shape:<28}"
        for setting in settings:
            r = cells.get(setting)
            text += " | " + (f"{r['float_ms']:9.2f} /{r['packed_ms']:9.2f} {r['speedup']:5.1f}x"
                             if r else " " * 29)
        lines.append(text)
    return "\n".join(lines)


def run_fresh_process(module: str, arguments: List[str], environment: Dict[str, str], what: str) -> None:
    """``python -m module arguments`` in a new process with ``environment`` added (its stdout
    discarded: it logs to the JSON-lines file); a failure is one :class:`UserError` line."""
    child = subprocess.run([sys.executable, "-m", module, *arguments], env={**os.environ, **environment},
                           stdout=subprocess.DEVNULL, check=False)
    if child.returncode != 0:
        raise UserError(f"the measurement process for {what} failed (exit {child.returncode})")


def run_per_thread_count(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Each thread count in a fresh process (``OMP_NUM_THREADS`` set from the start); their records.

    Switching PyTorch's thread count back and forth inside one process was not
    reliable here: after a 1 -> 2 -> 1 -> 2 sequence a float convolution at
    batch 1 sometimes ran at its one-thread speed on two threads, which would
    flatter the packed side.
    """
    start = args.out.stat().st_size if args.out.exists() else 0
    for threads in args.threads:
        LOG.info("%d thread(s): a fresh process", threads)
        run_fresh_process("xnornet.packed.benchmark",
                          ["--archs", *args.archs, "--batch-sizes", *map(str, args.batch_sizes),
                           "--threads", str(threads), "--repeats", str(args.repeats), "--budget", str(args.budget),
                           "--out", str(args.out)],
                          {"OMP_NUM_THREADS": str(threads)}, f"{threads} thread(s)")
    with open(args.out, encoding="utf-8") as handle:
        handle.seek(start)
        return [record for record in map(json.loads, handle) if record.get("event") in ("layer", "network")]


def main(args: argparse.Namespace) -> List[Dict[str, Any]]:
    start = time.perf_counter()
    if len(args.threads) > 1:
        records = run_per_thread_count(args)
    else:
        log = MetricsLog(args.out)
        log.write(run_header(vars(args), load_average=os.getloadavg(),
                             omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                             omp_wait_policy=os.environ.get("OMP_WAIT_POLICY")))
        records = []
        for arch in args.archs:
            records += benchmark_network(arch, args, log)
        log.write({"event": "end", "seconds": time.perf_counter() - start, "load_average": os.getloadavg(),
                   "numba_threading_layer": kernels.threading_layer()})  # the layer in use, now that loops have run
    print(format_table(records))
    print(f"logged to {args.out} ({time.perf_counter() - start:.0f} s, load average now "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())})")
    return records


if __name__ == "__main__":
    setup_logging()
    run_cli(main, get_args_parser().parse_args(sys.argv[1:]))
