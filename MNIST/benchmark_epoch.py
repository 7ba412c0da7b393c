"""Seconds per training epoch: our tensor pipeline vs a 2017-style per-sample pipeline.

Both train the same model with the same step (``xnornet.engine.train_one_epoch``):
only the data path differs. The 2017 pipeline decodes every sample through
PIL, ``ToTensor`` and ``Normalize`` in a ``DataLoader``, every epoch; ours
decodes once and batches by indexing a tensor.

    python MNIST/benchmark_epoch.py --data ../shared/data --out MNIST/logs/epoch_benchmark.jsonl
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from lenet import ARCHITECTURES, build_model
from mnist_data import MEAN, STD, load_mnist
from xnornet import BinOp
from xnornet.cli import ArgumentParser, UserError, positive_int, run_cli, setup_logging
from xnornet.engine import iterate_tensors, train_one_epoch
from xnornet.metrics import MetricsLog, run_header

LOG = logging.getLogger("xnornet")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Compare seconds per MNIST training epoch of two data pipelines")
    parser.add_argument("--data", type=Path, default=Path("./data"), help="folder holding MNIST/raw")
    parser.add_argument("--arch", default="LeNet_5", choices=sorted(ARCHITECTURES))
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--repeats", type=positive_int, default=1, help="epochs timed per pipeline (alternating)")
    parser.add_argument("--max-batches", type=positive_int, default=None,
                        help="stop each epoch after N batches (for a quick check; the README figure uses full epochs)")
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    return parser


def torchvision_batches(root: Path, batch_size: int, generator: torch.Generator):
    from torchvision import datasets, transforms

    dataset = datasets.MNIST(
        str(root), train=True, download=False,
        transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))]),
    )
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


def limited(batches, max_batches):
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            return
        yield batch


def time_epoch(args: argparse.Namespace, make_batches, num_batches: int) -> float:
    torch.manual_seed(0)
    model = build_model(args.arch)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-5)
    start = time.perf_counter()
    train_one_epoch(model, BinOp(model), limited(make_batches(), args.max_batches), optimizer,
                    nn.CrossEntropyLoss(), epoch=1, device=torch.device("cpu"),
                    num_batches=num_batches, log_interval=10**9)
    return time.perf_counter() - start


def main(args: argparse.Namespace) -> None:
    data = load_mnist(args.data, torch.device("cpu"))
    images, labels = data["train"]
    num_batches = -(-len(labels) // args.batch_size)
    if args.max_batches is not None:
        num_batches = min(num_batches, args.max_batches)
    pipelines = {
        "tensor": lambda: iterate_tensors(images, labels, args.batch_size,
                                          generator=torch.Generator().manual_seed(1)),
        "per_sample_2017": lambda: torchvision_batches(args.data, args.batch_size, torch.Generator().manual_seed(1)),
    }
    try:
        pipelines["per_sample_2017"]()
    except RuntimeError as err:
        raise UserError(f"torchvision cannot read MNIST under {args.data}: {err}") from None
    seconds = {name: [] for name in pipelines}
    for _ in range(args.repeats):
        for name, make in pipelines.items():
            seconds[name].append(time_epoch(args, make, num_batches))
            LOG.info("%s: %.1f s for %d batches", name, seconds[name][-1], num_batches)
    ours, theirs = min(seconds["tensor"]), min(seconds["per_sample_2017"])
    result = {"arch": args.arch, "batches": num_batches, "batch_size": args.batch_size,
              "tensor_s_per_epoch": ours, "per_sample_2017_s_per_epoch": theirs,
              "speedup": theirs / ours, "all_seconds": seconds}
    if args.out is not None:
        log = MetricsLog(args.out)
        log.write(run_header(vars(args)))
        log.write(result)
    print(f"{'pipeline':<18}{'s/epoch':>10}")
    print(f"{'tensor (ours)':<18}{ours:>10.1f}")
    print(f"{'per-sample 2017':<18}{theirs:>10.1f}")
    print(f"speedup: {theirs / ours:.2f}x ({args.arch}, {num_batches} batches of {args.batch_size}, "
          f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    setup_logging()
    run_cli(main, get_args_parser().parse_args(sys.argv[1:]))
