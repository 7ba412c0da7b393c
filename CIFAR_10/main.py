"""Train and evaluate Network-in-Network (XNOR-Net or float) on CIFAR-10.

    python CIFAR_10/main.py --data DIR                        # 2017 recipe: nin, 319 epochs
    python CIFAR_10/main.py --arch nin_float --data DIR       # float counterpart
    python CIFAR_10/main.py --protocol standard --data DIR    # crop + flip instead of GCN+ZCA
    python CIFAR_10/main.py --pretrained PATH --evaluate --data DIR
    python CIFAR_10/main.py --resume runs/nin-.../last.pth --data DIR
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from cifar_data import FORMATS, download, load_cifar10
from cifar_protocol import PROTOCOLS, prepare
from nin import ARCHITECTURES, build_model
from xnornet.cache import CACHE_ENV, check_outside, resolve_cache_dir
from xnornet.cli import ArgumentParser, UserError, positive_int, run_cli, setup_logging
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
)

RECIPE_DIR = Path(__file__).resolve().parent
LOG = logging.getLogger("xnornet")
MILESTONES = (120, 200, 240, 280)

#: --recipe presets (flags given on the command line override them).
PRESETS = {
    "2017": {},
    "cpu": {"amp": "bf16", "crop_flip": True, "holdout": 5000, "lr_schedule": "cosine", "epochs": 50},
}
PRESET_DESCRIPTIONS = {
    "2017": "the 2017 recipe: GCN+ZCA, no augmentation, 319 epochs, lr x0.1 at 120, 200, 240, 280",
    "cpu": "GCN+ZCA with crop+flip, cosine decay over 50 epochs, bfloat16 autocast, the last 5,000 training "
           "images held out (about 4.5 h on 2 CPU cores)",
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="XNOR-Net Network-in-Network on CIFAR-10 "
                                        "(Adam, lr x0.1 at epochs 120, 200, 240, 280)")
    add_arch_arg(parser, ARCHITECTURES, "nin",
                 "nin = XNOR (2017), nin_float = float counterpart, nin_bwn = binary weights only, "
                 "nin_K = XNOR with the activation scale K")
    group = add_data_args(parser, data_help="folder holding cifar-10-batches-py/, cifar-10-batches-bin/ or the 2017 "
                                            "arrays train_data, train_labels, test_data, test_labels",
                          download_help="fetch the python version into --data with torchvision first",
                          test_batch_size=100, tensor_data=True)
    group.add_argument("--data-format", default="auto", choices=FORMATS,
                       help="which layout to read; auto = the first found of npy, py, bin (default: auto)")
    group.add_argument("--protocol", default="seed", choices=PROTOCOLS,
                       help="seed = GCN+ZCA, no augmentation (2017), fitted on all training images (--holdout "
                            "ones included); standard = per-channel mean/std, random crop 32 (padding 4) and "
                            "horizontal flip (default: seed)")
    group.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                       help=f"where the GCN+ZCA result is cached (default: ${CACHE_ENV} or ~/.cache/xnornet)")
    group.add_argument("--crop-flip", action=argparse.BooleanOptionalAction, default=None,
                       help="augment training images by a random crop 32 of the image padded by 4 (zeros) and a "
                            "horizontal flip (default: on for --protocol standard, off for seed, as in 2017)")
    group = parser.add_argument_group("schedule")
    group.add_argument("--milestones", type=positive_int, nargs="+", default=list(MILESTONES), metavar="E",
                       help="epochs at which the learning rate is multiplied by 0.1, in increasing order; with "
                            "--lr-schedule step a milestone past --epochs only warns, as it would apply once a "
                            "--resume raises --epochs (default: 120 200 240 280)")
    add_common_args(parser, epochs=319, lr=0.01, weight_decay=1e-5, batch_size=128)
    parser.add_presets(PRESETS, default="2017", descriptions=PRESET_DESCRIPTIONS)
    return parser


def check_milestones(args: argparse.Namespace) -> None:
    """--milestones must increase; with the step schedule, milestones past --epochs are reported
    (a warning, not an error: a --resume that raises --epochs reaches them)."""
    milestones = list(args.milestones)
    if any(later <= earlier for earlier, later in zip(milestones, milestones[1:])):
        raise UserError(f"--milestones {' '.join(map(str, milestones))} must be increasing")
    late = [m for m in milestones if m > args.epochs]
    if late and args.lr_schedule == "step" and not args.evaluate:
        LOG.warning("warning: --milestones %s: past --epochs %d, so the learning rate never drops there in this run",
                    " ".join(map(str, late)), args.epochs)


def main(args: argparse.Namespace) -> dict:
    args = restore_run_args(args)  # --resume continues the run's own recipe
    check_run_inputs(args, RECIPE_DIR, architectures=ARCHITECTURES)
    check_milestones(args)
    torch.manual_seed(args.seed)
    use_cuda = torch.cuda.is_available() and not args.cpu
    dist_info = init_distributed(use_cuda=use_cuda)
    if use_cuda:
        torch.backends.cudnn.benchmark = True
    amp_dtype, memory_format = precision(args, dist_info.device)

    if args.download:
        download(args.data)
    raw = load_cifar10(args.data, args.data_format)
    args.data_layout = raw.layout  # recorded in the log header and checkpoints
    LOG.info("CIFAR-10 (%s layout): %d training and %d test images from %s",
             raw.layout, len(raw.train_labels), len(raw.test_labels), raw.folder)
    cache_dir = resolve_cache_dir(args.cache_dir)
    if args.protocol == "seed" and not raw.preprocessed:
        check_outside(cache_dir, args.data)
    data = prepare(raw, args.protocol, device=dist_info.device, cache_dir=cache_dir,
                   train_subset=args.train_subset, test_subset=args.test_subset, memory_format=memory_format,
                   crop_flip=args.crop_flip, holdout=args.holdout)
    LOG.info("protocol %s%s: training on %d images, %stesting on %d",
             args.protocol, " with crop+flip" if data.train_transform is not None else "",
             len(data.train_labels), f"holding out {args.holdout}, " if args.holdout else "", len(data.test_labels))

    model = build_model(args.arch).to(dist_info.device, memory_format=memory_format)

    def train_batches(epoch: int):
        # Shuffle and augmentation depend only on (seed, epoch): a resumed run sees the same batches.
        generator = torch.Generator().manual_seed(epoch_seed(args.seed, epoch))
        transform = None
        if data.train_transform is not None:
            augment = data.train_transform

            def transform(batch: torch.Tensor) -> torch.Tensor:
                return augment(batch, generator)

        return iterate_tensors(data.train_images, data.train_labels, args.batch_size,
                               generator=generator, transform=transform, drop_single_last=True)

    def test_batches():
        return iterate_tensors(data.test_images, data.test_labels, args.test_batch_size)

    def holdout_batches():
        return iterate_tensors(data.holdout_images, data.holdout_labels, args.test_batch_size)

    return run_recipe(
        args,
        model=model,
        train_batches=train_batches,
        num_train_batches=train_batch_count(len(data.train_labels), args.batch_size),
        test_batches=test_batches,
        milestones=args.milestones,
        dist_info=dist_info,
        recipe_dir=RECIPE_DIR,
        amp_dtype=amp_dtype,
        holdout_batches=holdout_batches if args.holdout else None,
        build_model=build_model,
    )


if __name__ == "__main__":
    setup_logging()
    run_cli(main, get_args_parser().parse_args(sys.argv[1:]))
