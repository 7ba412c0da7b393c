"""Training steps per second on the CPU: float32 NCHW against each speed option, side by side.

    python benchmarks/train_speed.py                       # NIN XNOR and LeNet-5 XNOR, batch 128, 2 threads
    python benchmarks/train_speed.py --archs nin nin_float --steps 10 --log benchmarks/logs/train_speed.jsonl

Each (network, configuration) is timed in a fresh process with the same thread count, so
that no configuration inherits another's warm caches, compiled graphs or thread pools. A
step is the recipes' own (``xnornet.engine.train_one_epoch``: BinOp binarizes, forward,
backward, restore, corrected gradient, Adam) on synthetic batches of the real shapes.
The configurations:

- ``fp32``: float32, NCHW (contiguous) tensors, eager: the baseline;
- ``fp32-cl``: float32, channels_last;
- ``bf16``: ``torch.autocast("cpu", torch.bfloat16)`` (``--amp``), NCHW;
- ``bf16-cl``: bfloat16 autocast and channels_last (``--amp``, what the CPU recipes use);
- ``bf16-cl-compile``: the same through ``torch.compile`` (inductor).

One JSON line per measurement goes to ``--log`` after a header (git commit, hardware).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("fp32", "fp32-cl", "bf16", "bf16-cl", "bf16-cl-compile")
#: --arch -> (recipe folder, model module, input shape of one image)
NETWORKS = {
    "nin": ("CIFAR_10", "nin", (3, 32, 32)),
    "nin_float": ("CIFAR_10", "nin", (3, 32, 32)),
    "LeNet_5": ("MNIST", "lenet", (1, 28, 28)),
    "LeNet_5_float": ("MNIST", "lenet", (1, 28, 28)),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=["nin", "LeNet_5"], choices=sorted(NETWORKS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10,
                        help="timed steps per measurement, each alone; the median is reported (default: 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3; compile runs here)")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads (default: 2)")
    parser.add_argument("--log", type=Path, default=None, help="append JSON lines here")
    parser.add_argument("--one", nargs=2, metavar=("ARCH", "CONFIG"), help=argparse.SUPPRESS)  # child process
    return parser


def measure(arch: str, config: str, batch_size: int, steps: int, warmup: int) -> Dict[str, float]:
    """Time ``steps`` training steps of ``arch`` in ``config`` (in this process)."""
    import torch
    import torch.nn as nn

    from xnornet.binop import BinOp
    from xnornet.engine import train_one_epoch

    folder, module_name, shape = NETWORKS[arch]
    sys.path.insert(0, str(REPO_ROOT / folder))
    network = __import__(module_name)
    torch.manual_seed(0)
    channels_last = "-cl" in config
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = network.build_model(arch).to(memory_format=memory_format)
    bin_op = BinOp(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    train_model = torch.compile(model) if config.endswith("compile") else model
    amp_dtype = torch.bfloat16 if config.startswith("bf16") else None
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch_size, *shape, generator=generator).contiguous(memory_format=memory_format),
                torch.randint(0, 10, (batch_size,), generator=generator)) for _ in range(2)]

    def run(count: int) -> float:
        start = time.perf_counter()
        train_one_epoch(train_model, bin_op, (batches[i % 2] for i in range(count)), optimizer,
                        nn.CrossEntropyLoss(), epoch=1, device=torch.device("cpu"), num_batches=count,
                        log_interval=count, amp_dtype=amp_dtype)
        return time.perf_counter() - start

    warmup_seconds = run(warmup)
    # Each step timed alone; the median resists the stretches in which this VM runs slow.
    times = sorted(run(1) for _ in range(steps))
    median = statistics.median(times)
    return {"arch": arch, "config": config, "batch_size": batch_size, "steps": steps,
            "threads": torch.get_num_threads(), "steps_per_second": 1.0 / median,
            "seconds_per_step": median, "fastest_step": times[0], "slowest_step": times[-1],
            "warmup_seconds": warmup_seconds}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    arch, config = args.one
    print(json.dumps(measure(arch, config, args.batch_size, args.steps, args.warmup)))


def main(args: argparse.Namespace) -> List[dict]:
    sys.path.insert(0, str(REPO_ROOT))
    from xnornet.metrics import MetricsLog, run_header

    log = MetricsLog(args.log) if args.log else None
    if log is not None:
        log.write(run_header(vars(args), script="benchmarks/train_speed.py"))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    results = []
    for arch in args.archs:
        baseline = None
        for config in args.configs:
            command = [sys.executable, __file__, "--one", arch, config, "--batch-size", str(args.batch_size),
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.stderr.write(f"{arch} {config} failed:\n{done.stderr[-2000:]}\n")
                continue
            record = json.loads(done.stdout.strip().splitlines()[-1])
            baseline = record["steps_per_second"] if config == "fp32" else baseline
            if baseline:
                record["speedup_over_fp32"] = record["steps_per_second"] / baseline
            results.append(record)
            if log is not None:
                log.write(record)
            print(f"{arch:14s} {config:16s} {record['steps_per_second']:7.3f} steps/s "
                  f"{record['seconds_per_step']:7.3f} s/step  x{record.get('speedup_over_fp32', float('nan')):.2f}",
                  flush=True)
    return results


if __name__ == "__main__":
    parsed = get_args_parser().parse_args()
    if parsed.one:
        child(parsed)
    else:
        main(parsed)
