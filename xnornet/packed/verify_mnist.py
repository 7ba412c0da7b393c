"""Check the packed engine against the float simulation on the real MNIST test set.

    python -m xnornet.packed.verify_mnist --checkpoint MNIST/models/LeNet_5.pth --data DIR

Runs the 10,000 test images through (1) the simulated model (BinOp binarization +
float convolutions), (2) the packed model in memory and (3) the packed model
written to an ``.xnor`` file and loaded back, then logs the three accuracies,
the number of differing predictions and the largest relative logit error to
``MNIST/logs/packed_exactness.jsonl`` (a run header names the commit and the CPU).
Exits with status 1 when the packed predictions differ or the error exceeds 1e-4.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch
import torch.nn as nn

from ..binop import BinOp
from ..checkpoint import checkpoint_accuracy, load_file, load_model_state, model_state_from
from ..cli import ArgumentParser, UserError, positive_int, run_cli, setup_logging
from ..metrics import REPO_ROOT, MetricsLog, run_header
from .archs import build_arch, import_recipe_file
from .engine import pack_model
from .fileformat import load_packed, save_packed

LOG = logging.getLogger("xnornet")
#: The exactness bound of the packed engine on logits (float rounding only).
MAX_RELATIVE_ERROR = 1e-4


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m xnornet.packed.verify_mnist", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a LeNet-5 checkpoint (any supported format)")
    parser.add_argument("--arch", default=None, help="architecture (default: the one the checkpoint names)")
    parser.add_argument("--data", type=Path, default=Path("./data"), metavar="DIR",
                        help="folder holding MNIST/raw/*-ubyte (default: ./data)")
    parser.add_argument("--batch-size", type=positive_int, default=500, metavar="N", help="(default: 500)")
    parser.add_argument("--log", type=Path, default=REPO_ROOT / "MNIST" / "logs" / "packed_exactness.jsonl",
                        metavar="FILE", help="JSON-lines log to append to (default: MNIST/logs/packed_exactness.jsonl)")
    return parser


@torch.no_grad()
def logits_of(model: nn.Module, images: torch.Tensor, batch_size: int, simulate: bool) -> torch.Tensor:
    """The model's logits on ``images``; ``simulate`` binarizes the weights with BinOp first."""
    model.eval()
    bin_op = BinOp(model)
    outputs = []
    with bin_op.binarized() if simulate else torch.no_grad():
        for begin in range(0, images.shape[0], batch_size):
            outputs.append(model(images[begin:begin + batch_size]).float())
    return torch.cat(outputs)


def compare(reference: torch.Tensor, other: torch.Tensor, labels: torch.Tensor) -> Dict[str, Any]:
    """Accuracy of ``other``, predictions differing from ``reference``, largest per-sample relative error."""
    scale = reference.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    relative = ((other - reference).abs().amax(dim=1) / scale).max().item()
    return {
        "acc": 100.0 * (other.argmax(dim=1) == labels).sum().item() / labels.numel(),
        "differing_predictions": int((other.argmax(dim=1) != reference.argmax(dim=1)).sum().item()),
        "max_relative_logit_error": relative,
    }


def main(args: argparse.Namespace) -> Dict[str, Any]:
    checkpoint = load_file(args.checkpoint)
    arch = args.arch or checkpoint.get("arch") or "LeNet_5"
    model = build_arch(str(arch)).eval()
    load_model_state(model, model_state_from(checkpoint), f"checkpoint {args.checkpoint!r}")
    data = import_recipe_file("MNIST/mnist_data.py")
    if not args.data.exists():
        raise UserError(f"--data {str(args.data)!r} does not exist")
    images, labels = data.load_split(args.data, "test")
    images = data.normalize(images)
    torch.manual_seed(0)

    # Pack first: BinOp.restore() leaves the centred-and-clamped weights in the model, and
    # centring those again is not bit-exact; both paths must start from the stored weights.
    packed = pack_model(model)
    simulated = logits_of(model, images, args.batch_size, simulate=True)
    in_memory = logits_of(packed, images, args.batch_size, simulate=False)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.xnor"
        file_bytes = save_packed(packed, path, arch=str(arch))
        loaded, _ = load_packed(path)
    from_file = logits_of(loaded, images, args.batch_size, simulate=False)

    record = {
        "event": "packed_exactness",
        "arch": arch,
        "checkpoint": str(args.checkpoint),
        "checkpoint_epoch": checkpoint.get("epoch"),
        "checkpoint_claimed_acc": checkpoint_accuracy(checkpoint),
        "test_count": int(labels.numel()),
        "simulated_acc": 100.0 * (simulated.argmax(dim=1) == labels).sum().item() / labels.numel(),
        "packed": compare(simulated, in_memory, labels),
        "packed_file": compare(simulated, from_file, labels),
        "file_equals_memory": bool(torch.equal(in_memory, from_file)),
        "file_bytes": file_bytes,
        "threads": torch.get_num_threads(),
    }
    log = MetricsLog(args.log)
    log.write(run_header(vars(args)))
    log.write(record)
    exact = all(record[key]["differing_predictions"] == 0
                and record[key]["max_relative_logit_error"] <= MAX_RELATIVE_ERROR for key in ("packed", "packed_file"))
    print(f"simulated {record['simulated_acc']:.2f}%, packed {record['packed']['acc']:.2f}%, "
          f"packed file {record['packed_file']['acc']:.2f}%; differing predictions "
          f"{record['packed']['differing_predictions']}/{record['test_count']}, max relative logit error "
          f"{record['packed']['max_relative_logit_error']:.2e} (logged to {args.log})")
    if not exact:
        raise UserError("the packed engine does not reproduce the simulated model (see the log)")
    return record


if __name__ == "__main__":
    setup_logging()
    run_cli(main, get_args_parser().parse_args(sys.argv[1:]))
