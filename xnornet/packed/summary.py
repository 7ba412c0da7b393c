"""A per-layer size summary of a packed model (in the spirit of Larq's ``summary``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch.nn as nn

from .fileformat import packed_arrays, packed_blocks


@dataclass
class LayerRow:
    name: str
    kind: str
    params: int  # float values of the layer in the float model (weights, biases, BatchNorm statistics)
    bits_per_weight: int  # of the weight tensor in the packed file
    float_bytes: int  # those values as float32
    packed_bytes: int  # bytes of the layer's tensors in the packed file (header excluded)


def _owner(key: str, blocks: List[str]) -> str:
    for name in blocks:
        if key.startswith(name + "."):
            return name
    return key.rpartition(".")[0]


def layer_rows(float_model: nn.Module, packed_model: nn.Module) -> List[LayerRow]:
    """One row per layer holding tensors, in state_dict order."""
    blocks = packed_blocks(packed_model)
    names = list(blocks)
    float_sizes: Dict[str, int] = {}
    for key, value in float_model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            owner = _owner(key, names)
            float_sizes[owner] = float_sizes.get(owner, 0) + value.numel()
    packed_sizes: Dict[str, int] = {}
    for key, array in packed_arrays(packed_model).items():
        owner = _owner(key, names)
        packed_sizes[owner] = packed_sizes.get(owner, 0) + array.nbytes
    rows = []
    for owner, count in float_sizes.items():
        if owner in blocks:
            c = blocks[owner].config
            shape = "linear" if c.linear else f"conv {c.kernel_size}x{c.kernel_size}"
            kind, bits = f"{c.kind} {shape}", 1
        else:
            kind, bits = type(float_model.get_submodule(owner)).__name__, 32
        rows.append(LayerRow(owner, kind, count, bits, 4 * count, packed_sizes.get(owner, 0)))
    return rows


def format_summary(rows: List[LayerRow], file_bytes: int) -> str:
    """The table, a total line and the compression of the whole file against float32."""
    header = f"{'layer':<16} {'kind':<16} {'params':>10} {'bits/w':>6} {'float32 B':>11} {'packed B':>10} {'ratio':>7}"
    lines = [header, "-" * len(header)]
    for row in rows:
        # A layer with no bytes of its own was folded into another one (the fusion plan).
        ratio = f"{row.float_bytes / row.packed_bytes:>6.1f}x" if row.packed_bytes else " folded"
        lines.append(f"{row.name:<16} {row.kind:<16} {row.params:>10,} {row.bits_per_weight:>6} "
                     f"{row.float_bytes:>11,} {row.packed_bytes:>10,} {ratio}")
    params = sum(row.params for row in rows)
    float_bytes = sum(row.float_bytes for row in rows)
    tensor_bytes = sum(row.packed_bytes for row in rows)
    lines.append("-" * len(header))
    lines.append(f"{'tensors':<16} {'':<16} {params:>10,} {'':>6} {float_bytes:>11,} {tensor_bytes:>10,} "
                 f"{float_bytes / tensor_bytes:>6.1f}x")
    lines.append(f"{'file':<16} {'(with header)':<16} {'':>10} {'':>6} {float_bytes:>11,} {file_bytes:>10,} "
                 f"{float_bytes / file_bytes:>6.1f}x")
    return "\n".join(lines)
