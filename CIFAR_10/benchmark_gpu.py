"""Time the CIFAR-10 training step and test pass; project the 319-epoch schedule.

    python CIFAR_10/benchmark_gpu.py                          # GPU, synthetic data, nin and nin_float
    python CIFAR_10/benchmark_gpu.py --amp --protocol standard
    python CIFAR_10/benchmark_gpu.py --data DIR               # real data (GCN+ZCA from the cache)
    python CIFAR_10/benchmark_gpu.py --cpu --steps 5 --batch-size 16   # a quick check on the CPU

It installs nothing and uses the recipe's own pieces: the same model, data
protocol (data on the device, batched augmentation), BinOp and engine step as
``main.py``. Synthetic data has the real shapes and dtypes. One JSON line per
architecture goes to ``--log`` (after a header with git commit and hardware).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn

from cifar_data import RawCifar, load_cifar10
from cifar_protocol import PROTOCOLS, PreparedData, prepare
from nin import ARCHITECTURES, build_model
from xnornet.binop import BinOp
from xnornet.cache import check_outside, resolve_cache_dir
from xnornet.cli import ArgumentParser, positive_int, run_cli, setup_logging
from xnornet.engine import Batch, evaluate, iterate_tensors, train_one_epoch
from xnornet.metrics import MetricsLog, run_header

RECIPE_DIR = Path(__file__).resolve().parent
LOG = logging.getLogger("xnornet")
TRAIN_IMAGES, TEST_IMAGES, EPOCHS = 50_000, 10_000, 319


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Seconds per CIFAR-10 epoch and the projected 319-epoch time")
    parser.add_argument("--archs", nargs="+", default=["nin", "nin_float"], choices=sorted(ARCHITECTURES))
    parser.add_argument("--steps", type=positive_int, default=50, metavar="N", help="timed training steps")
    parser.add_argument("--warmup", type=positive_int, default=10, metavar="N", help="untimed steps first")
    parser.add_argument("--eval-steps", type=positive_int, default=20, metavar="N", help="timed test batches")
    parser.add_argument("--batch-size", type=positive_int, default=128, metavar="N")
    parser.add_argument("--test-batch-size", type=positive_int, default=100, metavar="N")
    parser.add_argument("--protocol", default="seed", choices=PROTOCOLS,
                        help="seed: float inputs, no augmentation; standard: uint8 + crop/flip on the device")
    parser.add_argument("--data", type=Path, default=None, metavar="DIR",
                        help="use the real data set found there (default: synthetic data)")
    parser.add_argument("--cache-dir", type=Path, default=None, metavar="DIR", help="GCN+ZCA cache for --data")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is available")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels_last memory format (default: on with CUDA)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log", type=Path, default=None, metavar="FILE",
                        help="JSON-lines output, appended (default: CIFAR_10/logs/benchmark_<cpu|cuda>.jsonl)")
    return parser


def synthetic_data(args: argparse.Namespace, device: torch.device, memory_format: torch.memory_format
                   ) -> PreparedData:
    """Random data with the shapes and dtypes of the real protocol (no GCN+ZCA fit needed)."""
    generator = torch.Generator().manual_seed(args.seed)
    n_train = min(TRAIN_IMAGES, (args.warmup + args.steps) * args.batch_size)
    n_test = min(TEST_IMAGES, args.eval_steps * args.test_batch_size)
    train_labels = torch.randint(0, 10, (n_train,), generator=generator)
    test_labels = torch.randint(0, 10, (n_test,), generator=generator)
    if args.protocol == "standard":
        pixels = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), generator=generator, dtype=torch.uint8).numpy()
        raw = RawCifar("bin", Path("synthetic"), pixels[:n_train], train_labels.numpy(), pixels[n_train:],
                       test_labels.numpy())
        return prepare(raw, "standard", device=device, cache_dir=Path("unused"), memory_format=memory_format)

    def images(count: int) -> torch.Tensor:
        return torch.randn(count, 3, 32, 32, generator=generator).to(device).contiguous(memory_format=memory_format)

    return PreparedData(images(n_train), train_labels.to(device), images(n_test), test_labels.to(device))


def cycle_batches(data: PreparedData, batch_size: int, count: int, seed: int) -> Iterator[Batch]:
    """``count`` full training batches, as main.py makes them, cycling over epochs if needed."""
    generator = torch.Generator().manual_seed(seed)
    transform = None
    if data.train_transform is not None:
        augment = data.train_transform

        def transform(batch: torch.Tensor) -> torch.Tensor:
            return augment(batch, generator)

    epochs = (iterate_tensors(data.train_images, data.train_labels, batch_size, generator=generator,
                              transform=transform, drop_last=True) for _ in itertools.count())
    return itertools.islice(itertools.chain.from_iterable(epochs), count)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(arch: str, data: PreparedData, args: argparse.Namespace, device: torch.device,
              memory_format: torch.memory_format, amp_dtype: Optional[torch.dtype]) -> dict:
    torch.manual_seed(args.seed)
    model = build_model(arch).to(device, memory_format=memory_format)
    bin_op = BinOp(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-5)
    criterion = nn.CrossEntropyLoss()

    def run_steps(count: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        train_one_epoch(model, bin_op, cycle_batches(data, args.batch_size, count, args.seed), optimizer,
                        criterion, epoch=1, device=device, num_batches=count, log_interval=10**9,
                        amp_dtype=amp_dtype)
        synchronize(device)
        return time.perf_counter() - start

    run_steps(args.warmup)
    train_seconds = run_steps(args.steps)
    test_batches = list(itertools.islice(
        iterate_tensors(data.test_images, data.test_labels, args.test_batch_size), args.eval_steps))
    evaluate(model, bin_op, test_batches[:1], criterion, device=device, amp_dtype=amp_dtype)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    evaluate(model, bin_op, test_batches, criterion, device=device, amp_dtype=amp_dtype)
    synchronize(device)
    test_seconds = time.perf_counter() - start

    step = train_seconds / args.steps
    test_batch = test_seconds / len(test_batches)
    epoch = -(-TRAIN_IMAGES // args.batch_size) * step + -(-TEST_IMAGES // args.test_batch_size) * test_batch
    return {
        "arch": arch, "device": str(device), "protocol": args.protocol, "data": "real" if args.data else "synthetic",
        "batch_size": args.batch_size, "amp": amp_dtype is not None,
        "channels_last": memory_format == torch.channels_last,
        "steps": args.steps, "train_steps_per_second": args.steps / train_seconds,
        "train_images_per_second": args.steps * args.batch_size / train_seconds,
        "test_images_per_second": sum(len(t) for _, t in test_batches) / test_seconds,
        "seconds_per_epoch": epoch, "projected_hours_319_epochs": epoch * EPOCHS / 3600.0,
        "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        # Other work on the machine slows a CPU measurement down: record how busy it was.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def main(args: argparse.Namespace) -> list:
    use_cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.backends.cudnn.benchmark = True
    channels_last = use_cuda if args.channels_last is None else args.channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    amp_dtype = torch.bfloat16 if args.amp and use_cuda else None
    if args.data is not None:
        raw, cache_dir = load_cifar10(args.data), resolve_cache_dir(args.cache_dir)
        if args.protocol == "seed" and not raw.preprocessed:
            check_outside(cache_dir, args.data)
        data = prepare(raw, args.protocol, device=device, cache_dir=cache_dir, memory_format=memory_format)
    else:
        data = synthetic_data(args, device, memory_format)
    log_path = args.log or RECIPE_DIR / "logs" / f"benchmark_{device.type}.jsonl"
    log = MetricsLog(log_path)
    log.write(run_header(vars(args), script="CIFAR_10/benchmark_gpu.py", device=device))
    results = []
    for arch in args.archs:
        result = benchmark(arch, data, args, device, memory_format, amp_dtype)
        log.write(result)
        print(f"{arch} on {device}: {result['train_steps_per_second']:.2f} steps/s (batch {args.batch_size}), "
              f"{result['seconds_per_epoch']:.1f} s/epoch, "
              f"{EPOCHS} epochs ~ {result['projected_hours_319_epochs']:.2f} h")
        results.append(result)
    return results


if __name__ == "__main__":
    setup_logging()
    run_cli(main, get_args_parser().parse_args(sys.argv[1:]))
