"""The ``.xnor`` file: a packed model in safetensors, loadable without pickle.

safetensors (a flat header of JSON, then raw little-endian arrays) holds:

- every float tensor of the non-binarized layers under its state_dict key
  (``conv1.weight``, ``xnor.1.running_mean``, ...; ``num_batches_tracked`` is left out);
- per binarized block ``NAME``: ``NAME.weight_bits`` (uint64, the dense sign bits of
  :mod:`~xnornet.packed.pack`); ``NAME.alpha`` and ``NAME.bias`` (float32 [O]), or
  ``NAME.output_limit`` (int16/int32 [O]) for a block that emits the next block's
  sign bits; ``NAME.threshold`` (float32, the exact sign thresholds; XNOR blocks
  fed a tensor) or the block's BatchNorm ``NAME.bn.*`` (blocks with the activation
  scale K, BWN blocks). Modules folded into a block's thresholds store nothing.

The string metadata holds ``format`` (``xnornet-packed``), ``version``, ``arch``,
``model_args`` (JSON keyword arguments of the architecture constructor),
``blocks`` (JSON: each block's :meth:`~xnornet.packed.engine.BlockConfig.signature`), ``fusion``
(JSON: the :class:`~xnornet.packed.engine.FusionPlan`), and
free-form provenance (``source``, ``claimed_acc``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..atomic import atomic_file
from ..checkpoint import is_safetensors_file
from ..cli import UserError, check_file, one_line
from ..layers import BinConv2d
from .archs import build_arch
from .engine import (
    XNOR,
    BlockConfig,
    FusionPlan,
    PackedBinConv2d,
    apply_fusion,
    replace_module,
)

FORMAT_NAME = "xnornet-packed"
FORMAT_VERSION = 2
COMPACT = (",", ":")  # JSON without spaces: the header counts in the file size

PathLike = Union[str, os.PathLike]


def packed_blocks(model: nn.Module) -> Dict[str, PackedBinConv2d]:
    return {name: module for name, module in model.named_modules() if isinstance(module, PackedBinConv2d)}


def packed_arrays(model: nn.Module) -> Dict[str, np.ndarray]:
    """The tensors a packed model's file holds (module docstring), as numpy arrays."""
    bit_keys = {f"{name}.weight_bits" for name in packed_blocks(model)}
    arrays = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        array = np.ascontiguousarray(value.detach().cpu().numpy())
        arrays[key] = array.view(np.uint64) if key in bit_keys else array
    return arrays


def save_packed(
    model: nn.Module, path: PathLike, *, arch: str, model_args: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> int:
    """Write a packed model (from :func:`~xnornet.packed.pack_model`) atomically; returns the file size."""
    from safetensors.numpy import save_file

    blocks = packed_blocks(model)
    if not blocks:
        raise UserError(f"architecture {arch} has no BinConv2d block: nothing to pack")
    metadata = {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "arch": arch,
        "model_args": json.dumps(dict(model_args or {}), sort_keys=True),
        "blocks": json.dumps({name: block.config.signature() for name, block in blocks.items()}, separators=COMPACT),
        "fusion": json.dumps(getattr(model, "fusion_plan", FusionPlan({}, {}, {}, {})).to_dict(), separators=COMPACT),
        "bit_order": "sign +1 = bit 1; bit i of the flattened [O, C/groups, KH, KW] signs = bit i%64 of word i//64",
    }
    metadata.update({key: str(value) for key, value in (extra or {}).items()})
    with atomic_file(path) as tmp_name:
        save_file(packed_arrays(model), tmp_name, metadata=metadata)
    return Path(path).stat().st_size


def read_packed(path: PathLike) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """The arrays and metadata of a ``.xnor`` file; bad files raise :class:`UserError`."""
    from safetensors import SafetensorError, safe_open

    path = check_file(path, "packed model")
    if not is_safetensors_file(path):
        raise UserError(f"{str(path)!r} is not a packed xnornet model (not a safetensors file; a PyTorch checkpoint "
                        "is made into one by python -m xnornet.export)")
    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = dict(handle.metadata() or {})
            arrays = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{str(path)!r} is not a packed xnornet model ({one_line(str(err), 160)})") from None
    if metadata.get("format") != FORMAT_NAME:
        raise UserError(f"{str(path)!r} is not a packed xnornet model (format {metadata.get('format')!r})")
    if metadata.get("version") != str(FORMAT_VERSION):
        raise UserError(f"{str(path)!r} has packed format version {metadata.get('version')}; "
                        f"this code reads version {FORMAT_VERSION}")
    return arrays, metadata


def load_packed(path: PathLike) -> Tuple[nn.Module, Dict[str, str]]:
    """Rebuild the packed model of a ``.xnor`` file (eval mode) and return it with the file's metadata."""
    arrays, metadata = read_packed(path)
    source = f"packed model {str(path)!r}"
    try:
        block_configs = json.loads(metadata["blocks"])
        model_args = json.loads(metadata.get("model_args", "{}"))
        arch = metadata["arch"]
        plan = FusionPlan(**json.loads(metadata["fusion"]))
    except (KeyError, ValueError, TypeError) as err:
        raise UserError(f"{source} has unreadable metadata ({err})") from None
    model = build_arch(arch, model_args).eval()
    found = {name: module for name, module in model.named_modules() if isinstance(module, BinConv2d)}
    if set(found) != set(block_configs):
        raise UserError(f"{source} does not fit {arch}: its blocks {sorted(block_configs)} "
                        f"are not the model's {sorted(found)}")
    tensors = {key: torch.from_numpy(array.view(np.int64) if key.endswith(".weight_bits") else array)
               for key, array in arrays.items()}
    for name, block in found.items():
        config = BlockConfig.from_block(block)
        if config.signature() != block_configs[name]:
            raise UserError(f"{source}: block {name} is '{block_configs[name]}', the model has '{config.signature()}'")
        fed_bits = any(consumer == name for consumer, _ in plan.bit_outputs.values())
        try:
            packed = PackedBinConv2d(
                config, tensors[f"{name}.weight_bits"], tensors.get(f"{name}.alpha"), tensors.get(f"{name}.bias"),
                threshold=tensors.get(f"{name}.threshold") if config.kind == XNOR and not fed_bits else None,
                bn=None if config.kind == XNOR else block.bn,
                output_limit=tensors.get(f"{name}.output_limit"),
                output_padding=int(plan.bit_outputs[name][1]) if name in plan.bit_outputs else None,
                bit_input=fed_bits,
            )
        except (KeyError, ValueError) as err:
            raise UserError(f"{source}: block {name} is incomplete or malformed ({err})") from None
        replace_module(model, name, packed)
    try:
        apply_fusion(model, plan)
    except (AttributeError, ValueError, TypeError) as err:
        raise UserError(f"{source}: its fusion plan does not fit {arch} ({err})") from None
    model.fusion_plan = plan
    _load_float_state(model, tensors, source)
    return model.eval(), metadata


def _load_float_state(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = sorted(k for k in set(own) - set(tensors) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(tensors) - set(own))
    reshaped = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or reshaped:
        parts = [f"{label}: {', '.join(keys[:5])}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped)) if keys]
        raise UserError(f"{source} does not fit its architecture ({'; '.join(parts)})")
    model.load_state_dict(dict(tensors), strict=False)
