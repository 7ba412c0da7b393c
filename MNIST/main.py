"""Train and evaluate LeNet-5 (XNOR-Net or float) on MNIST.

    python MNIST/main.py --data DIR                      # 2017 recipe, 60 epochs
    python MNIST/main.py --recipe cpu --data DIR         # ours in 25 epochs, bfloat16: < 10 min on 2 cores
    python MNIST/main.py --arch LeNet_5_float --data DIR # float counterpart
    python MNIST/main.py --pretrained MNIST/models/LeNet_5.pth --evaluate --data DIR
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from lenet import ARCHITECTURES, build_model
from mnist_data import BACKGROUND, download, load_mnist
from xnornet.augment import random_crop_flip
from xnornet.cli import ArgumentParser, UserError, int_in_range, positive_int, run_cli, setup_logging
from xnornet.distributed import init_distributed
from xnornet.engine import epoch_seed, iterate_tensors, train_batch_count
from xnornet.recipe import (
    add_arch_arg,
    add_common_args,
    add_data_args,
    check_run_inputs,
    precision,
    restore_run_args,
    run_recipe,
    subset_size,
)

RECIPE_DIR = Path(__file__).resolve().parent
LOG = logging.getLogger("xnornet")

#: --recipe presets (flags given on the command line override them).
PRESETS = {
    "2017": {},
    "ours": {"shift": 2, "lr_schedule": "cosine"},
    "cpu": {"shift": 2, "lr_schedule": "cosine", "epochs": 25, "amp": "bf16"},
}
PRESET_DESCRIPTIONS = {
    "2017": "the 2017 recipe, 60 epochs, lr / 10 every 15",
    "ours": "2017 + random shifts of up to 2 px + cosine decay, 60 epochs",
    "cpu": "ours in 25 epochs with bfloat16 autocast, a complete run in under 10 minutes on 2 CPU cores",
}


#: MNIST images are 28 x 28 pixels.
IMAGE_SIZE = 28


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="XNOR-Net LeNet-5 on MNIST (Adam; defaults = the 2017 recipe)")
    add_arch_arg(parser, ARCHITECTURES, "LeNet_5",
                 "LeNet_5 = XNOR (2017), LeNet_5_float = float counterpart, LeNet_5_bwn = binary weights only, "
                 "LeNet_5_K = XNOR with the activation scale K")
    group = add_data_args(parser, data_help="folder holding MNIST/raw/*-ubyte, as torchvision lays it out",
                          download_help="fetch MNIST into --data with torchvision first",
                          test_batch_size=128, tensor_data=True)
    group.add_argument("--shift", type=int_in_range(0, IMAGE_SIZE - 1, f"the images are {IMAGE_SIZE} px"),
                       default=0, metavar="PX",
                       help="augment training images by a random shift of up to PX pixels in each direction "
                            "(pad with the background and crop); 0 = none, as 2017 (default: 0)")
    group = parser.add_argument_group("schedule")
    group.add_argument("--lr-epochs", type=positive_int, default=15, metavar="N",
                       help="divide the learning rate by 10 every N epochs: lr = lr0 * 0.1 ** (epoch // N), "
                            "epochs counted from 1 as in the 2017 MNIST code (default: 15: drops at 15, 30, 45, 60)")
    add_common_args(parser, epochs=60, lr=0.01, weight_decay=1e-5, batch_size=128)
    parser.add_presets(PRESETS, default="2017", descriptions=PRESET_DESCRIPTIONS)
    return parser


def main(args: argparse.Namespace) -> dict:
    args = restore_run_args(args)  # --resume continues the run's own recipe
    check_run_inputs(args, RECIPE_DIR, architectures=ARCHITECTURES)
    torch.manual_seed(args.seed)
    dist_info = init_distributed(use_cuda=torch.cuda.is_available() and not args.cpu)
    if args.download:
        download(args.data)
    amp_dtype, memory_format = precision(args, dist_info.device)
    data = load_mnist(args.data, dist_info.device)
    train_images, train_labels = data["train"]
    test_images, test_labels = data["test"]
    n_train = subset_size(args.train_subset, len(train_labels), "--train-subset", "training")
    n_test = subset_size(args.test_subset, len(test_labels), "--test-subset", "test")
    train_images, train_labels = train_images[:n_train], train_labels[:n_train]
    test_images, test_labels = test_images[:n_test], test_labels[:n_test]
    if args.holdout >= len(train_labels):
        raise UserError(f"--holdout {args.holdout} leaves no training image of the {len(train_labels)}")
    kept = len(train_labels) - args.holdout
    holdout_images, holdout_labels = train_images[kept:], train_labels[kept:]
    train_images, train_labels = train_images[:kept], train_labels[:kept]
    train_images = train_images.contiguous(memory_format=memory_format)
    test_images = test_images.contiguous(memory_format=memory_format)
    LOG.info("MNIST: %d training and %d test images from %s", len(train_labels), len(test_labels), args.data)

    model = build_model(args.arch).to(dist_info.device, memory_format=memory_format)

    def train_batches(epoch: int):
        # Shuffle and shifts depend only on (seed, epoch): a resumed run sees the same batches.
        generator = torch.Generator().manual_seed(epoch_seed(args.seed, epoch))
        transform = None
        if args.shift:
            def transform(batch: torch.Tensor) -> torch.Tensor:
                return random_crop_flip(batch, padding=args.shift, generator=generator, flip=False, fill=BACKGROUND)

        return iterate_tensors(train_images, train_labels, args.batch_size, generator=generator, transform=transform,
                               drop_single_last=True)

    def test_batches():
        return iterate_tensors(test_images, test_labels, args.test_batch_size)

    def holdout_batches():
        return iterate_tensors(holdout_images, holdout_labels, args.test_batch_size)

    return run_recipe(
        args,
        model=model,
        train_batches=train_batches,
        num_train_batches=train_batch_count(len(train_labels), args.batch_size),
        test_batches=test_batches,
        milestones=list(range(args.lr_epochs, args.epochs + 1, args.lr_epochs)),
        dist_info=dist_info,
        recipe_dir=RECIPE_DIR,
        amp_dtype=amp_dtype,
        holdout_batches=holdout_batches if args.holdout else None,
    )


if __name__ == "__main__":
    setup_logging()
    run_cli(main, get_args_parser().parse_args(sys.argv[1:]))
