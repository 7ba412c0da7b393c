"""Checkpoints: atomic writes, safe loading, 2017-format compatibility, RNG state.

A training checkpoint is a dict::

    {"format": "xnornet-checkpoint", "version": 1, "arch": str,
     "state_dict": ..., "optimizer": ..., "epoch": int (last finished, 1-based),
     "best_acc": float, "last_acc": float, "args": dict, "rng": dict}

A shipped checkpoint keeps only ``arch``, ``state_dict``, ``epoch``, ``acc``.
2017 files (``{"acc" or "best_acc" or "best_prec1", "state_dict"}``, the ImageNet
ones also ``epoch``, ``arch`` and ``optimizer``; keys possibly holding a
``module.`` segment) are accepted by :func:`model_state_from`. Files written by
PyTorch 0.2-0.4 (the legacy, non-zip serialization, which ``torch.load`` still
reads) lack the BatchNorm ``num_batches_tracked`` counters (added in PyTorch 0.4.1):
:func:`load_model_state` fills them with 0, as PyTorch itself does for such files.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from .atomic import atomic_file
from .cli import UserError, check_file, one_line

FORMAT_NAME = "xnornet-checkpoint"
FORMAT_VERSION = 1
LAST_NAME = "last.pth"
BEST_NAME = "best.pth"

PathLike = Union[str, os.PathLike]


def save_atomic(obj: Any, path: PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    A crash mid-write leaves the previous file intact.
    """
    with atomic_file(path) as tmp_name:
        torch.save(obj, tmp_name)


#: The first bytes of a safetensors file (what ``.xnor`` packed models are): an 8-byte
#: little-endian header length, then the JSON header's opening brace.
_SAFETENSORS_HEADER_LIMIT = 100_000_000


def is_safetensors_file(path: PathLike) -> bool:
    """Whether ``path`` starts like a safetensors file (a packed ``.xnor`` model), not a checkpoint."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(9)
    except OSError:
        return False
    if len(start) < 9:
        return False
    header_bytes = int.from_bytes(start[:8], "little")
    return 0 < header_bytes < _SAFETENSORS_HEADER_LIMIT and start[8:9] == b"{"


def _load_failure(err: BaseException) -> str:
    """Why ``torch.load`` failed, in one line that keeps the reason."""
    text = one_line(str(err))
    if isinstance(err, EOFError) or not text:
        return "the file is empty or ends early"
    if "central directory" in text or "PytorchStreamReader" in text:
        return "it is truncated or corrupt: not a complete PyTorch zip archive"
    if "Weights only load failed" in text:
        # The reason follows "WeightsUnpickler error:"; the rest is advice to load unsafely.
        reason = text.split("WeightsUnpickler error:", 1)[-1].split(" Check the documentation", 1)[0].strip()
        return f"it holds data that safe loading (weights_only) refuses: {one_line(reason, 160) or 'unknown'}"
    return one_line(text, 240)


def load_file(path: PathLike, what: str = "checkpoint") -> Dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; bad files raise :class:`UserError`."""
    path = check_file(path, what)
    if is_safetensors_file(path):
        raise UserError(
            f"{what} {str(path)!r} is a packed .xnor model (safetensors), not a PyTorch checkpoint: "
            "--pretrained, --resume and --evaluate --packed take the .pth it was exported from; "
            "a .xnor file is read by xnornet.packed.load_packed"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the pickle-protocol note before a refusal
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  corrupt bytes also raise IndexError, KeyError, struct.error...
        raise UserError(f"{what} {str(path)!r} is not a readable PyTorch checkpoint ({_load_failure(err)})") from None
    if not isinstance(obj, Mapping):
        raise UserError(f"{what} {str(path)!r} holds a {type(obj).__name__}, expected a dict with a state_dict")
    return dict(obj)


#: Which recipe trains which networks, by the start of the arch name. The core imports no
#: recipe, so the prefixes are listed here: every name in MNIST/lenet.py's ARCHITECTURES
#: starts with LeNet_5, CIFAR_10/nin.py's with nin, ImageNet/alexnet.py's with alexnet.
RECIPE_OF_ARCH_PREFIX = (
    ("LeNet_5", "MNIST/main.py"),
    ("nin", "CIFAR_10/main.py"),
    ("alexnet", "ImageNet/main.py"),
)


def recipe_of_arch(arch: Optional[str]) -> Optional[str]:
    """The recipe (``MNIST/main.py``, ...) that trains ``arch``, or None for a name none of them has."""
    for prefix, recipe in RECIPE_OF_ARCH_PREFIX:
        if isinstance(arch, str) and arch.startswith(prefix):
            return recipe
    return None


def arch_mismatch(source: str, found: str, expected: str) -> str:
    """The message for a checkpoint (``source``, e.g. "--pretrained checkpoint 'x.pth'") of arch
    ``found`` given to a run of ``expected``: advice that can work (--arch, or the recipe to use)."""
    found_recipe, own_recipe = recipe_of_arch(found), recipe_of_arch(expected)
    if found_recipe is not None and found_recipe == own_recipe:
        return f"{source} was trained as --arch {found}, not {expected}: pass --arch {found}"
    if found_recipe is not None:
        return (f"{source} holds a {found} network, which {found_recipe} trains and evaluates, "
                f"not this recipe ({own_recipe or expected}): run {found_recipe} with it")
    return f"{source} holds a network of arch {found!r}, which no recipe here builds (this run is {expected})"


def model_state_from(checkpoint: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The model state_dict in any supported checkpoint format, ``module.`` prefixes removed."""
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
        state = checkpoint["state_dict"]
    elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state = checkpoint  # a bare state_dict
    else:
        raise UserError("checkpoint has no 'state_dict' entry (keys: " + ", ".join(sorted(map(str, checkpoint))[:8]) + ")")
    # DataParallel/DDP insert a "module." segment: at the front, or inside the key when the
    # 2017 ImageNet code wrapped only `features` (features.module.0.weight).
    return {".".join(part for part in key.split(".") if part != "module"): value for key, value in state.items()}


def checkpoint_accuracy(checkpoint: Mapping[str, Any]) -> Optional[float]:
    """The accuracy a checkpoint claims (ours or the 2017 keys), if any."""
    for key in ("acc", "best_acc", "best_prec1"):
        if key in checkpoint:
            value = checkpoint[key]
            return float(value.item() if isinstance(value, torch.Tensor) else value)
    return None


#: The BatchNorm buffer that PyTorch 0.4.1 added; older files lack it.
BATCH_COUNTER = "num_batches_tracked"


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` whose failure names the mismatched keys in one line.

    A BatchNorm ``num_batches_tracked`` counter missing from ``state`` (files of PyTorch
    0.2-0.4) is set to 0, as PyTorch does for such files, and never reported; every other
    missing, unexpected or mis-shaped key is.
    """
    own = model.state_dict()
    counters = {key: torch.zeros_like(value) for key, value in own.items()
                if key.rsplit(".", 1)[-1] == BATCH_COUNTER and key not in state}
    if counters:
        state = {**state, **counters}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or reshaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped)):
            if keys:
                shown = ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
                parts.append(f"{label}: {shown}")
        raise UserError(
            f"{source} does not fit architecture {type(model).__name__} ({'; '.join(parts)}); check --arch"
        )
    model.load_state_dict(state, strict=True)


def capture_rng_state() -> Dict[str, Any]:
    """The RNG states of torch (CPU and CUDA), numpy and python, storable with weights_only."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss_next = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # Plain tensors and numbers only, so that weights_only loading can read them.
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": int(py_version), "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss_next},  # None or the float random.gauss() returns next
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        ("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"], np_state["gauss"])
    )
    py_state = state["python"]
    random.setstate(
        (py_state["version"], tuple(int(v) for v in py_state["internal"].tolist()), py_state.get("gauss_next"))
    )
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_checkpoint(
    *,
    arch: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    best_acc: float,
    last_acc: float,
    args: Mapping[str, Any],
) -> Dict[str, Any]:
    """The full checkpoint written as ``last`` and ``best`` (see module docstring)."""
    plain_args = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in args.items()}
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "arch": arch,
        "state_dict": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "best_acc": best_acc,
        "last_acc": last_acc,
        "args": plain_args,
        "rng": capture_rng_state(),
    }


def shipped_checkpoint(checkpoint: Mapping[str, Any]) -> Dict[str, Any]:
    """The small file we ship: weights, arch, epoch and accuracy; no optimizer, no RNG."""
    acc = checkpoint.get("last_acc", checkpoint_accuracy(checkpoint))
    return {
        "arch": checkpoint.get("arch"),
        "state_dict": model_state_from(checkpoint),
        "epoch": checkpoint.get("epoch"),
        "acc": acc,
    }


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel/DataParallel, or the model itself."""
    return getattr(model, "module", model)


def _strip_main() -> None:
    import argparse

    from .cli import ArgumentParser, check_output_file, run_cli

    parser = ArgumentParser(
        prog="python -m xnornet.checkpoint",
        description="Write the small, shippable form of a training checkpoint (weights, arch, epoch, accuracy).",
    )
    parser.add_argument("checkpoint", help="a best.pth or last.pth written by a recipe")
    parser.add_argument("output", help="where to write the stripped checkpoint (a new file)")
    args = parser.parse_args()

    def strip(ns: argparse.Namespace) -> None:
        output = check_output_file(ns.output, "output")
        if output.exists() and output.resolve() == Path(ns.checkpoint).resolve():
            raise UserError(f"output {output} is the checkpoint itself: write the stripped form to another file")
        small = shipped_checkpoint(load_file(ns.checkpoint))
        save_atomic(small, output)
        print(f"wrote {output} (arch {small['arch']}, epoch {small['epoch']}, acc {small['acc']})")

    run_cli(strip, args)


if __name__ == "__main__":
    _strip_main()
