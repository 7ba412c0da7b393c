"""A per-layer model summary (in the spirit of Larq's ``summary``): shapes, parameters,
which layers are binarized, multiply-accumulates and memory, float32 against packed.

The core knows no recipe: a recipe's model file hands its ``ARCHITECTURES`` to
:func:`summary_cli`, so ``python MNIST/lenet.py --arch LeNet_5`` prints the table, and
a recipe's ``main.py`` can log it with :func:`log_model_summary`.

Conventions:

- rows are the leaf modules, except that a :class:`~xnornet.layers.ConvBlock`
  (BatchNorm -> sign -> Conv2d/Linear -> ReLU) is one row;
- a block is *binarized* when it is a :class:`~xnornet.layers.BinConv2d` (chosen by type,
  as :class:`~xnornet.binop.BinOp` does); its weight takes 1 bit, everything else 32;
- MACs are counted for one input image, for Conv2d and Linear weights only; a MAC is
  *binary* when both its weight and its input are 1 bit (XNOR blocks); the binary-weight
  (BWN) variant's MACs count as float, since their inputs are real;
- "packed" memory is 1 bit per binarized weight plus a float32 alpha per output filter,
  and float32 for every other value (biases, BatchNorm, float layers);
- parameters include BatchNorm running statistics (what inference needs), not
  ``num_batches_tracked``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .cli import ArgumentParser, UserError, one_line, run_cli
from .layers import BinConv2d, ConvBlock

LOG = logging.getLogger("xnornet")

FLOAT_BITS = 32


@dataclass
class LayerSummary:
    """One row of the summary."""

    name: str
    kind: str
    output_shape: Optional[Tuple[int, ...]]  # per image; None when the forward pass never reached it
    params: int
    binarized: bool
    bits_per_weight: Optional[int]  # None for layers without values (ReLU, pooling)
    binary_macs: int
    float_macs: int
    float32_bytes: int
    packed_bytes: int


@dataclass
class ModelSummary:
    """Rows and totals; :meth:`table` formats them."""

    input_shape: Tuple[int, ...]
    rows: List[LayerSummary] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(row.params for row in self.rows)

    @property
    def binary_macs(self) -> int:
        return sum(row.binary_macs for row in self.rows)

    @property
    def float_macs(self) -> int:
        return sum(row.float_macs for row in self.rows)

    @property
    def macs(self) -> int:
        return self.binary_macs + self.float_macs

    @property
    def binary_mac_share(self) -> float:
        """The fraction (0-1) of all MACs that are binary."""
        return self.binary_macs / self.macs if self.macs else 0.0

    @property
    def float32_bytes(self) -> int:
        return sum(row.float32_bytes for row in self.rows)

    @property
    def packed_bytes(self) -> int:
        return sum(row.packed_bytes for row in self.rows)

    def table(self) -> str:
        """The per-layer table, a total line and the MAC and memory figures."""
        return format_table(self)


def _values(module: nn.Module) -> int:
    """Parameters and buffers of ``module`` (recursively), without ``num_batches_tracked``."""
    state = module.state_dict()
    return sum(value.numel() for key, value in state.items() if not key.endswith("num_batches_tracked"))


def _weight_macs(layer: nn.Module, output_shape: Optional[Tuple[int, ...]]) -> int:
    """Multiply-accumulates of a Conv2d or Linear for one image producing ``output_shape``."""
    if output_shape is None:
        return 0
    if isinstance(layer, nn.Conv2d):
        per_output = layer.weight[0].numel()  # C_in / groups * kh * kw
        return math.prod(output_shape) * per_output
    if isinstance(layer, nn.Linear):
        return layer.in_features * layer.out_features
    return 0


def _block_kind(block: ConvBlock) -> str:
    name = type(block).__name__
    if isinstance(block, BinConv2d):
        if not block.binary_activations:
            name += " bwn"
        if block.activation_scale:
            name += " K"
    shape = "linear" if block.Linear else f"conv {block.kernel_size}x{block.kernel_size}"
    return f"{name} {shape}"


def _leaf_kind(module: nn.Module) -> str:
    name = type(module).__name__
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return f"{name} {kh}x{kw}"
    return name


def _row_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Leaf modules in definition order, each ConvBlock as one (its children skipped)."""
    rows: List[Tuple[str, nn.Module]] = []

    def visit(name: str, module: nn.Module) -> None:
        children = list(module.named_children())
        if isinstance(module, ConvBlock) or not children:
            rows.append((name or type(module).__name__, module))  # a bare layer or block is its own row
            return
        for child_name, child in children:
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return rows


@torch.no_grad()
def _output_shapes(model: nn.Module, modules: Sequence[Tuple[str, nn.Module]],
                   input_shape: Tuple[int, ...]) -> Dict[str, Tuple[int, ...]]:
    """Per-image output shape of each module, from one forward pass in eval mode.

    The model is left as it was: every module's training mode restored, and the BatchNorm scales that
    a block's forward clamps (>= 0.01) put back.
    """
    shapes: Dict[str, Tuple[int, ...]] = {}

    def recorder(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, torch.Tensor):
                shapes[name] = tuple(output.shape[1:])
        return hook

    handles = [module.register_forward_hook(recorder(name)) for name, module in modules]
    scales = [(m.bn.weight, m.bn.weight.detach().clone()) for m in model.modules()
              if isinstance(m, ConvBlock) and getattr(m.bn, "weight", None) is not None]
    modes = [(module, module.training) for module in model.modules()]
    reference = next(model.parameters(), None)
    dummy = torch.zeros((1, *input_shape), device=reference.device if reference is not None else "cpu",
                        dtype=reference.dtype if reference is not None else torch.float32)
    try:
        model.eval()
        model(dummy)
    except RuntimeError as err:
        reason = one_line(str(err), 240) or type(err).__name__
        raise UserError(f"the model does not take an input of shape {tuple(input_shape)} ({reason})") from None
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
        for parameter, saved in scales:
            parameter.copy_(saved)
    return shapes


def _summarize_row(name: str, module: nn.Module, output_shape: Optional[Tuple[int, ...]]) -> LayerSummary:
    params = _values(module)
    float32_bytes = 4 * params
    if isinstance(module, ConvBlock):
        layer = module.weight_layer
        macs = _weight_macs(layer, output_shape)
        binarized = isinstance(module, BinConv2d)
        binary_macs = macs if binarized and module.binary_activations else 0
        packed_bytes = float32_bytes
        if binarized:
            weights = layer.weight.numel()
            alphas = layer.weight.shape[0]
            packed_bytes = float32_bytes - 4 * weights + math.ceil(weights / 8) + 4 * alphas
        return LayerSummary(
            name=name, kind=_block_kind(module), output_shape=output_shape, params=params,
            binarized=binarized, bits_per_weight=1 if binarized else FLOAT_BITS,
            binary_macs=binary_macs, float_macs=macs - binary_macs,
            float32_bytes=float32_bytes, packed_bytes=packed_bytes,
        )
    return LayerSummary(
        name=name, kind=_leaf_kind(module), output_shape=output_shape, params=params,
        binarized=False, bits_per_weight=FLOAT_BITS if params else None,
        binary_macs=0, float_macs=_weight_macs(module, output_shape),
        float32_bytes=float32_bytes, packed_bytes=float32_bytes,
    )


def model_summary(model: nn.Module, input_shape: Sequence[int]) -> ModelSummary:
    """Summarize ``model`` for one input of ``input_shape`` (without the batch dimension,
    e.g. ``(1, 28, 28)``); one forward pass on zeros gives the output shapes."""
    shape = tuple(int(size) for size in input_shape)
    modules = _row_modules(model)
    shapes = _output_shapes(model, modules, shape)
    return ModelSummary(input_shape=shape,
                        rows=[_summarize_row(name, module, shapes.get(name)) for name, module in modules])


def log_model_summary(model: nn.Module, input_shape: Sequence[int]) -> ModelSummary:
    """:func:`model_summary`, its table logged at INFO (for the start of a recipe's run)."""
    summary = model_summary(model, input_shape)
    LOG.info("model summary (one %s input):\n%s", "x".join(map(str, summary.input_shape)), summary.table())
    return summary


def _shape_text(shape: Optional[Tuple[int, ...]]) -> str:
    return "x".join(map(str, shape)) if shape is not None else "-"


def _kib(size: float) -> str:
    return f"{size / 1024:,.1f} KiB" if size < 1024 ** 2 else f"{size / 1024 ** 2:,.2f} MiB"


def _millions(count: int) -> str:
    return f"{count / 1e6:,.2f} M"


def format_table(summary: ModelSummary) -> str:
    """The text table of ``summary``: one line per layer, then the totals."""
    header = (f"{'layer':<16} {'kind':<24} {'output':>12} {'params':>11} {'bin':>3} {'bits/w':>6} "
              f"{'binary MACs':>13} {'float MACs':>13} {'float32 B':>12} {'packed B':>11}")
    rule = "-" * len(header)
    lines = [header, rule]
    for row in summary.rows:
        bits = "-" if row.bits_per_weight is None else str(row.bits_per_weight)
        lines.append(
            f"{row.name:<16} {row.kind:<24} {_shape_text(row.output_shape):>12} {row.params:>11,} "
            f"{'yes' if row.binarized else 'no':>3} {bits:>6} {row.binary_macs:>13,} {row.float_macs:>13,} "
            f"{row.float32_bytes:>12,} {row.packed_bytes:>11,}"
        )
    lines.append(rule)
    lines.append(
        f"{'total':<16} {'':<24} {'':>12} {summary.params:>11,} {'':>3} {'':>6} {summary.binary_macs:>13,} "
        f"{summary.float_macs:>13,} {summary.float32_bytes:>12,} {summary.packed_bytes:>11,}"
    )
    binarized = sum(1 for row in summary.rows if row.binarized)
    ratio = summary.float32_bytes / summary.packed_bytes if summary.packed_bytes else float("nan")
    lines.append(f"input {_shape_text(summary.input_shape)}; {binarized} binarized layer(s); "
                 f"{summary.params:,} values (parameters and BatchNorm statistics)")
    lines.append(f"MACs per image: {_millions(summary.macs)} = {_millions(summary.binary_macs)} binary "
                 f"+ {_millions(summary.float_macs)} float ({100 * summary.binary_mac_share:.1f}% binary)")
    lines.append(f"memory: {_kib(summary.float32_bytes)} as float32, {_kib(summary.packed_bytes)} packed "
                 f"({ratio:.1f}x smaller)")
    return "\n".join(lines)


def get_args_parser(architectures: Mapping[str, Callable[[], nn.Module]], input_shape: Sequence[int],
                    default: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The summary command of a recipe's model file: ``--arch`` chooses among ``architectures``."""
    parser = ArgumentParser(prog=prog, description="Print a per-layer summary of a network: output shapes, "
                            "parameters, binarized layers, MACs (binary and float) and memory (float32 and packed).")
    parser.add_argument("--arch", default=default, choices=sorted(architectures),
                        help=f"the network to summarize (default: {default})")
    parser.add_argument("--input-shape", type=int, nargs="+", default=list(input_shape), metavar="N",
                        help=f"one input without the batch dimension (default: {' '.join(map(str, input_shape))})")
    parser.set_defaults(architectures=dict(architectures))
    return parser


def main(args: argparse.Namespace) -> ModelSummary:
    """Build ``args.arch`` from ``args.architectures`` and print its summary."""
    if any(size <= 0 for size in args.input_shape):
        raise UserError(f"--input-shape needs positive sizes, got {' '.join(map(str, args.input_shape))}")
    summary = model_summary(args.architectures[args.arch](), args.input_shape)
    print(f"{args.arch}, one {_shape_text(summary.input_shape)} input")
    print(summary.table())
    return summary


def summary_cli(architectures: Mapping[str, Callable[[], nn.Module]], input_shape: Sequence[int],
                default: str, argv: Optional[Sequence[str]] = None) -> None:
    """Run the summary command for a recipe's networks (call it under ``if __name__ == "__main__"``)."""
    prog = f"python {sys.argv[0]}" if sys.argv and sys.argv[0] else None
    parser = get_args_parser(architectures, input_shape, default, prog=prog)
    run_cli(main, parser.parse_args(sys.argv[1:] if argv is None else list(argv)))
