"""Export a trained checkpoint to a packed ``.xnor`` file and print its size summary.

    python -m xnornet.export MNIST/models/LeNet_5.pth -o LeNet_5.xnor
    python -m xnornet.export best.pth --arch nin -o nin.xnor
    python -m xnornet.export best.pth --arch alexnet --model-args '{"num_classes": 1000}' -o alexnet.xnor

Every BinConv2d block is packed (sign bits in 64-bit words, alpha, bias, exact
sign thresholds, see :mod:`xnornet.packed`); every other layer stays float32.
The file is safetensors: it loads without pickle (:func:`xnornet.packed.fileformat.load_packed`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict

from .checkpoint import checkpoint_accuracy, is_safetensors_file, load_file, load_model_state, model_state_from
from .cli import ArgumentParser, UserError, check_output_file, run_cli, setup_logging

LOG = logging.getLogger("xnornet")


def json_object(text: str) -> Dict[str, Any]:
    """argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"num_classes\": 10}}', got {text!r}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m xnornet.export",
                            description="Export a trained checkpoint to a packed .xnor file and print its size summary.")
    parser.add_argument("checkpoint", help="a checkpoint (best.pth, last.pth, shipped or 2017 format)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="FILE", help="the .xnor file to write")
    parser.add_argument("--arch", default=None,
                        help="architecture (--arch of the recipe); default: the one the checkpoint names")
    parser.add_argument("--model-args", type=json_object, default={}, metavar="JSON",
                        help="keyword arguments of the architecture constructor, e.g. AlexNet's "
                             "'{\"num_classes\": 1000, \"input_size\": 227}' (default: none)")
    return parser


def main(args: argparse.Namespace) -> Dict[str, Any]:
    from .packed import pack_model
    from .packed.archs import build_arch
    from .packed.fileformat import save_packed
    from .packed.summary import format_summary, layer_rows

    output = check_output_file(args.output, "-o/--output")
    if output.exists():
        if output.resolve() == Path(args.checkpoint).resolve():
            raise UserError(f"-o/--output {output} is the checkpoint itself: give the .xnor file another name")
        if not is_safetensors_file(output):
            raise UserError(f"-o/--output {output} exists and is not a packed .xnor model; "
                            "not replacing it: give another file name")
    checkpoint = load_file(args.checkpoint)
    arch = args.arch or checkpoint.get("arch")
    if not arch:
        raise UserError(f"checkpoint {args.checkpoint!r} does not name its architecture: pass --arch")
    model = build_arch(str(arch), args.model_args).eval()
    load_model_state(model, model_state_from(checkpoint), f"checkpoint {args.checkpoint!r}")
    packed = pack_model(model)
    claimed = checkpoint_accuracy(checkpoint)
    extra = {"source": Path(args.checkpoint).name}
    if claimed is not None:
        extra["claimed_acc"] = claimed
    size = save_packed(packed, args.output, arch=str(arch), model_args=args.model_args, extra=extra)
    rows = layer_rows(model, packed)
    print(format_summary(rows, size))
    float_bytes = sum(row.float_bytes for row in rows)
    checkpoint_bytes = Path(args.checkpoint).stat().st_size
    print(f"wrote {args.output}: {size:,} bytes, {float_bytes / size:.1f}x smaller than the float32 weights "
          f"({float_bytes:,} bytes; the checkpoint file is {checkpoint_bytes:,} bytes)")
    return {"arch": arch, "file_bytes": size, "float32_bytes": float_bytes, "checkpoint_bytes": checkpoint_bytes}


if __name__ == "__main__":
    setup_logging()
    run_cli(main, get_args_parser().parse_args(sys.argv[1:]))
