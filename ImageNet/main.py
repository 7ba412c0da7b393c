"""Train and evaluate AlexNet (XNOR-Net or float) on ImageNet, on one or many GPUs.

    python ImageNet/main.py --data DIR                                    # one process (GPU if any)
    torchrun --nproc_per_node 8 ImageNet/main.py --data DIR               # DistributedDataParallel
    python ImageNet/main.py --data DIR --caffe-data                       # Caffe LMDB layout
    python ImageNet/main.py --data DIR --pretrained PATH --evaluate       # top-1 / top-5 of a checkpoint

Each data layout defaults to the 2017 run made on it (``--recipe``): the Caffe LMDBs to the run
of the 2017 README's top-1 44.87% (``2017-caffe``), image folders to the final 2017 code's
torchvision run (``2017-torchvision``). See ImageNet/README.md for the data layouts, the two runs
and multi-node commands.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch.nn.parallel import DistributedDataParallel

from alexnet import (
    ARCHITECTURES,
    HIDDEN_FEATURES,
    INIT_SCALE_CAFFE_RUN,
    INIT_SCALE_FINAL,
    INPUT_SIZE,
    build_model,
    feature_map_size,
    smallest_input_size,
)
from imagenet_data import (
    rank_epoch_seed,
    load_imagenet,
    make_loaders,
    one_line_worker_errors,
    per_rank_batch_size,
)
from xnornet.cli import (
    ArgumentParser,
    UserError,
    non_negative_int,
    positive_float,
    positive_int,
    run_cli,
    setup_logging,
)
from xnornet.distributed import DistInfo, cleanup_distributed, init_distributed, world_size_from_env
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

#: --workers' default on a machine with at least this many CPUs.
MAX_WORKERS = 8

#: notes eq. (11): the 2017 ImageNet code multiplied the corrected weight gradient (already
#: scaled by n(1 - 1/C_in)) by a further 1e9.
LEGACY_GRAD_MULTIPLIER = 1e9

#: --recipe presets: the two 2017 runs (flags given on the command line override them).
CAFFE_RUN, TORCHVISION_RUN = "2017-caffe", "2017-torchvision"
PRESETS = {
    # The commit whose run on the Caffe LMDBs gave the 2017 README's top-1 44.87%, top-5 69.70%.
    CAFFE_RUN: {"init_scale": INIT_SCALE_CAFFE_RUN, "lr_epochs": 25, "weight_decay": 1e-5, "shuffle": False},
    # The final 2017 code; its torchvision run's log is named for weight decay 3e-6.
    TORCHVISION_RUN: {"init_scale": INIT_SCALE_FINAL, "lr_epochs": 30, "weight_decay": 3e-6, "shuffle": True},
}
PRESET_DESCRIPTIONS = {
    CAFFE_RUN: "the 2017 run on the Caffe LMDBs (top-1 44.87%%): weights ~ N(0, std 1/c), lr / 10 every 25 epochs, "
               "weight decay 1e-5, records in LMDB order; the default with --caffe-data",
    TORCHVISION_RUN: "the final 2017 code's run on image folders: weights ~ N(0, std 2/c), lr / 10 every 30 epochs, "
                     "weight decay 3e-6, reshuffled every epoch; the default without --caffe-data",
}


def _names_caffe_data(item: str) -> bool:
    """``--caffe-data`` or a prefix argparse accepts for it (``--ca``, ``--caffe``, ...)."""
    return len(item) >= len("--ca") and "--caffe-data".startswith(item)


class RecipeArgumentParser(ArgumentParser):
    """The shared parser, whose default ``--recipe`` follows the data layout: the 2017 run
    made on that layout (:data:`PRESETS`)."""

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None) -> Tuple[Any, List[str]]:
        argv = list(sys.argv[1:] if args is None else args)
        words = argv[:argv.index("--")] if "--" in argv else argv
        self.default_preset = CAFFE_RUN if any(_names_caffe_data(item) for item in words) else TORCHVISION_RUN
        self.set_defaults(recipe=self.default_preset)
        return super().parse_known_args(argv, namespace)


def get_args_parser() -> argparse.ArgumentParser:
    parser = RecipeArgumentParser(
        description="XNOR-Net AlexNet on ImageNet (Adam, lr / 10 every --lr-epochs epochs; defaults: the 2017 run "
                    "made on the chosen data layout, see --recipe)")
    add_arch_arg(parser, ARCHITECTURES, "alexnet",
                 "alexnet = XNOR (2017), alexnet_float = float counterpart, alexnet_bwn = binary weights only, "
                 "alexnet_K = XNOR with the activation scale K")
    group = add_data_args(parser, data_help="DIR/train and DIR/val class folders, or with --caffe-data "
                                            "DIR/ilsvrc12_{train,val}_lmdb and DIR/imagenet_mean.binaryproto",
                          test_batch_size=None)
    group.add_argument("--caffe-data", action="store_true",
                       help="read the Caffe LMDB layout (BGR minus the mean image) instead of image folders (RGB)")
    group.add_argument("-j", "--workers", type=non_negative_int, default=default_workers(), metavar="N",
                       help=f"data loading worker processes per GPU/process (default: min({MAX_WORKERS}, the CPUs "
                            "this process may use))")
    group.add_argument("--input-size", type=positive_int, default=INPUT_SIZE, metavar="N",
                       help=f"crop size fed to the network (default: {INPUT_SIZE}; the smallest is "
                            f"{smallest_input_size()}, for smoke tests)")
    group.add_argument("--resize", type=positive_int, default=256, metavar="N",
                       help="image folders only: resize every image to N x N before cropping; at least "
                            "--input-size (default: 256)")
    group.add_argument("--num-classes", type=positive_int, default=None, metavar="N",
                       help="number of classes (default: the number of class folders; 1000 with --caffe-data)")
    group.add_argument("--shuffle", action=argparse.BooleanOptionalAction,
                       default=PRESETS[TORCHVISION_RUN]["shuffle"],
                       help="reshuffle the training set every epoch; --no-shuffle reads it in its stored order "
                            "every epoch (default: from --recipe, off for 2017-caffe, on for 2017-torchvision)")
    group = parser.add_argument_group("schedule and model")
    group.add_argument("--start-epoch", type=positive_int, default=None, metavar="N",
                       help="first epoch to train, 1-based as in the logs (default: 1, or the epoch after a "
                            "--resume checkpoint's); the 2017 code counted from 0, so its N is our N+1")
    group.add_argument("--lr-epochs", type=positive_int, default=PRESETS[TORCHVISION_RUN]["lr_epochs"], metavar="N",
                       help="divide the learning rate by 10 every N epochs: lr = lr0 * 0.1 ** ((epoch - 1) // N) "
                            "(default: from --recipe, 25 for 2017-caffe: milestones 26, 51, 76; 30 for "
                            "2017-torchvision: 31, 61, 91)")
    group.add_argument("--init-scale", type=positive_float, default=PRESETS[TORCHVISION_RUN]["init_scale"],
                       metavar="S",
                       help="initial Conv2d/Linear weights ~ N(0, std S/c), c = elements per output filter "
                            "(default: from --recipe, 1 for 2017-caffe, 2 for 2017-torchvision)")
    group.add_argument("--hidden-features", type=positive_int, default=HIDDEN_FEATURES, metavar="N",
                       help=f"width of the two hidden classifier layers (default: {HIDDEN_FEATURES} as in 2017; "
                            "smaller only for smoke tests)")
    group.add_argument("--legacy-grad-multiplier", action="store_true",
                       help="multiply the corrected weight gradient by a further 1e9, on top of "
                            "--grad-scale, like the 2017 ImageNet code (notes eq. 11)")
    add_common_args(parser, epochs=100, lr=0.001, weight_decay=PRESETS[TORCHVISION_RUN]["weight_decay"],
                    batch_size=256)
    parser.add_presets(PRESETS, default=TORCHVISION_RUN, descriptions=PRESET_DESCRIPTIONS)
    return parser


def step_milestones(epochs: int, lr_epochs: int) -> List[int]:
    """1-based epochs where the lr drops: the 2017 ``lr0 * 0.1 ** (epoch0 // lr_epochs)`` with 0-based epochs."""
    return list(range(lr_epochs + 1, epochs + 1, lr_epochs))


def grad_multiplier(args: argparse.Namespace) -> float:
    """1e9 with --legacy-grad-multiplier (on top of --grad-scale, as the 2017 code did), else 1."""
    return LEGACY_GRAD_MULTIPLIER if args.legacy_grad_multiplier else 1.0


def default_workers() -> int:
    """``--workers``' default: :data:`MAX_WORKERS`, or fewer on a machine (or CPU set) with fewer CPUs."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on every platform
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cpus))


def main(args: argparse.Namespace) -> dict:
    args = restore_run_args(args)  # --resume continues the run's own recipe
    world_size = world_size_from_env()
    check_run_inputs(args, RECIPE_DIR, architectures=ARCHITECTURES,
                     batch_per_process=per_rank_batch_size(args.batch_size, world_size))
    args.grad_multiplier = grad_multiplier(args)
    if feature_map_size(args.input_size) < 1:
        raise UserError(f"--input-size {args.input_size} is too small for AlexNet (smallest: {smallest_input_size()})")
    if not args.caffe_data and args.resize < args.input_size:
        raise UserError(f"--resize {args.resize} is smaller than --input-size {args.input_size}: "
                        "the crop must fit in the resized image")
    use_cuda = torch.cuda.is_available() and not args.cpu
    dist_info = init_distributed(use_cuda)
    try:
        return train_or_evaluate(args, dist_info)
    finally:
        cleanup_distributed()


def train_or_evaluate(args: argparse.Namespace, dist_info: DistInfo) -> dict:
    batch_size = per_rank_batch_size(args.batch_size, dist_info.world_size)
    test_batch_size = (batch_size if args.test_batch_size is None
                       else per_rank_batch_size(args.test_batch_size, dist_info.world_size, flag="--test-batch-size"))
    amp_dtype, memory_format = precision(args, dist_info.device)
    if dist_info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    data = load_imagenet(args.data, caffe=args.caffe_data, crop=args.input_size, resize=args.resize,
                         num_classes=args.num_classes)
    LOG.info("%s", data.description)
    train_loader, train_sampler, val_loader = make_loaders(
        data, batch_size=batch_size, workers=args.workers, seed=args.seed, dist_info=dist_info, shuffle=args.shuffle,
        test_batch_size=test_batch_size)

    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(args.arch, num_classes=data.num_classes, input_size=args.input_size,
                        hidden_features=args.hidden_features, init_scale=args.init_scale,
                        ).to(dist_info.device, memory_format=memory_format)
    train_model = None
    if dist_info.enabled:
        device_ids = [dist_info.local_rank] if dist_info.device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=device_ids)
    LOG.info("%s: %.1fM parameters, %d processes x batch %d, %s", args.arch,
             sum(p.numel() for p in model.parameters()) / 1e6, dist_info.world_size, batch_size, dist_info.device)

    def train_batches(epoch: int):
        train_sampler.set_epoch(epoch)
        # Dropout, augmentation and worker seeds of this epoch depend only on (seed, epoch, rank).
        torch.manual_seed(rank_epoch_seed(args.seed, epoch, dist_info.rank))
        return one_line_worker_errors(train_loader)

    def test_batches():
        return one_line_worker_errors(val_loader)

    return run_recipe(
        args,
        model=model,
        train_batches=train_batches,
        num_train_batches=len(train_loader),
        test_batches=test_batches,
        milestones=step_milestones(args.epochs, args.lr_epochs),
        dist_info=dist_info,
        recipe_dir=RECIPE_DIR,
        topk=(1, 5),
        amp_dtype=amp_dtype,
        train_model=train_model,
        start_epoch=args.start_epoch,
    )


if __name__ == "__main__":
    setup_logging()
    run_cli(main, get_args_parser().parse_args(sys.argv[1:]))
