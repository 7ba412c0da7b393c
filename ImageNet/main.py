"""Train and evaluate AlexNet (XNOR-Net or float) on ImageNet, on one or many GPUs.

    python ImageNet/main.py --data DIR                                    # one process (GPU if any)
    torchrun --nproc_per_node 8 ImageNet/main.py --data DIR               # DistributedDataParallel
    python ImageNet/main.py --data DIR --caffe-data                       # Caffe LMDB layout
    python ImageNet/main.py --data DIR --pretrained PATH --evaluate       # top-1 / top-5 of a checkpoint

See ImageNet/README.md for the data layouts and multi-node commands.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List

import torch
from torch.nn.parallel import DistributedDataParallel

from alexnet import ARCHITECTURES, HIDDEN_FEATURES, INPUT_SIZE, build_model, feature_map_size, smallest_input_size
from imagenet_data import (
    rank_epoch_seed,
    load_imagenet,
    make_loaders,
    one_line_worker_errors,
    per_rank_batch_size,
)
from xnornet.cli import ArgumentParser, UserError, non_negative_int, positive_int, run_cli, setup_logging
from xnornet.distributed import DistInfo, cleanup_distributed, init_distributed
from xnornet.recipe import add_common_args, precision, run_recipe

RECIPE_DIR = Path(__file__).resolve().parent
LOG = logging.getLogger("xnornet")

#: notes eq. (11): the 2017 ImageNet code multiplied the corrected weight gradient (already
#: scaled by n(1 - 1/C_in)) by a further 1e9.
LEGACY_GRAD_MULTIPLIER = 1e9


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="XNOR-Net AlexNet on ImageNet (Adam, lr / 10 every --lr-epochs epochs)")
    parser.add_argument("--arch", "-a", default="alexnet", choices=sorted(ARCHITECTURES),
                        help="alexnet = XNOR (2017), alexnet_float = float counterpart, alexnet_bwn = binary "
                             "weights only, alexnet_K = XNOR with the activation scale K (default: alexnet)")
    parser.add_argument("--data", type=Path, default=Path("./data"), metavar="DIR",
                        help="DIR/train and DIR/val class folders, or with --caffe-data DIR/ilsvrc12_{train,val}_lmdb "
                             "and DIR/imagenet_mean.binaryproto (default: ./data)")
    parser.add_argument("--caffe-data", action="store_true",
                        help="read the Caffe LMDB layout (BGR minus the mean image) instead of image folders (RGB)")
    parser.add_argument("-j", "--workers", type=non_negative_int, default=8, metavar="N",
                        help="data loading worker processes per GPU/process (default: 8)")
    parser.add_argument("--start-epoch", type=positive_int, default=None, metavar="N",
                        help="first epoch to train, 1-based as in the logs (default: 1, or the epoch after a "
                             "--resume checkpoint's); the 2017 code counted from 0, so its N is our N+1")
    parser.add_argument("--lr-epochs", type=positive_int, default=25, metavar="N",
                        help="divide the learning rate by 10 every N epochs: lr = lr0 * 0.1 ** ((epoch - 1) // N) "
                             "(default: 25, milestones 26, 51, 76 as in 2017)")
    parser.add_argument("--input-size", type=positive_int, default=INPUT_SIZE, metavar="N",
                        help=f"crop size fed to the network (default: {INPUT_SIZE}; the smallest is "
                             f"{smallest_input_size()}, for smoke tests)")
    parser.add_argument("--resize", type=positive_int, default=256, metavar="N",
                        help="image folders only: resize every image to N x N before cropping (default: 256)")
    parser.add_argument("--num-classes", type=positive_int, default=None, metavar="N",
                        help="number of classes (default: the number of class folders; 1000 with --caffe-data)")
    parser.add_argument("--hidden-features", type=positive_int, default=HIDDEN_FEATURES, metavar="N",
                        help=f"width of the two hidden classifier layers (default: {HIDDEN_FEATURES} as in 2017; "
                             "smaller only for smoke tests)")
    parser.add_argument("--legacy-grad-multiplier", action="store_true",
                        help="multiply the corrected weight gradient by a further 1e9, on top of "
                             "--grad-scale, like the 2017 ImageNet code (notes eq. 11)")
    parser.add_argument("--no-cuda", action="store_true", help="run on the CPU even if CUDA is available")
    add_common_args(parser, epochs=100, lr=0.001, weight_decay=1e-5, batch_size=256)
    return parser


def step_milestones(epochs: int, lr_epochs: int) -> List[int]:
    """1-based epochs where the lr drops: the 2017 ``lr0 * 0.1 ** (epoch0 // lr_epochs)`` with 0-based epochs."""
    return list(range(lr_epochs + 1, epochs + 1, lr_epochs))


def grad_multiplier(args: argparse.Namespace) -> float:
    """1e9 with --legacy-grad-multiplier (on top of --grad-scale, as the 2017 code did), else 1."""
    return LEGACY_GRAD_MULTIPLIER if args.legacy_grad_multiplier else 1.0


def main(args: argparse.Namespace) -> dict:
    args.grad_multiplier = grad_multiplier(args)
    if feature_map_size(args.input_size) < 1:
        raise UserError(f"--input-size {args.input_size} is too small for AlexNet (smallest: {smallest_input_size()})")
    use_cuda = torch.cuda.is_available() and not args.no_cuda
    dist_info = init_distributed(use_cuda)
    try:
        return train_or_evaluate(args, dist_info)
    finally:
        cleanup_distributed()


def train_or_evaluate(args: argparse.Namespace, dist_info: DistInfo) -> dict:
    batch_size = per_rank_batch_size(args.batch_size, dist_info.world_size)
    amp_dtype, memory_format = precision(args, dist_info.device)
    if dist_info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    data = load_imagenet(args.data, caffe=args.caffe_data, crop=args.input_size, resize=args.resize,
                         num_classes=args.num_classes)
    LOG.info("%s", data.description)
    train_loader, train_sampler, val_loader = make_loaders(
        data, batch_size=batch_size, workers=args.workers, seed=args.seed, dist_info=dist_info)

    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(args.arch, num_classes=data.num_classes, input_size=args.input_size,
                        hidden_features=args.hidden_features).to(dist_info.device, memory_format=memory_format)
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
