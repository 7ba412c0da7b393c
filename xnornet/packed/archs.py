"""Which recipe file defines an architecture, imported lazily by path.

A packed file names its architecture (``LeNet_5``, ``nin``, ``alexnet``, ...);
rebuilding it needs the recipe's model constructor. Each recipe folder has a
model file with an ``ARCHITECTURES`` dict of ``--arch`` names.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Mapping, Optional

import torch.nn as nn

from ..cli import UserError
from ..metrics import REPO_ROOT

#: --arch prefix -> the recipe's model file, relative to the repository root.
MODEL_FILES: Dict[str, str] = {
    "LeNet_5": "MNIST/lenet.py",
    "nin": "CIFAR_10/nin.py",
    "alexnet": "ImageNet/alexnet.py",
}


def import_recipe_file(relative: str) -> ModuleType:
    """Import a recipe module (e.g. ``MNIST/lenet.py``) by path, with its folder on sys.path.

    Reuses the module when the recipe's main.py already imported it under its
    own name (recipe module names are unique across folders).
    """
    path = (REPO_ROOT / relative).resolve()
    if not path.is_file():
        raise UserError(f"{relative} is not in this checkout ({REPO_ROOT}); it defines the model to rebuild")
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path:
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.path.remove(folder)
    return module


def model_file_for(arch: str) -> Optional[str]:
    """The recipe model file whose ``--arch`` names start with the prefix of ``arch``."""
    for prefix, relative in MODEL_FILES.items():
        if arch.startswith(prefix):
            return relative
    return None


def build_arch(arch: str, model_args: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """A fresh (float, randomly initialized) model of ``arch``, built by its recipe file."""
    relative = model_file_for(arch)
    if relative is None:
        raise UserError(f"unknown architecture {arch!r}: expected a name starting with one of "
                        f"{', '.join(MODEL_FILES)}")
    architectures = getattr(import_recipe_file(relative), "ARCHITECTURES", {})
    if arch not in architectures:
        raise UserError(f"{relative} has no architecture {arch!r} (it has: {', '.join(sorted(architectures))})")
    try:
        return architectures[arch](**dict(model_args or {}))
    except (TypeError, ValueError) as err:
        raise UserError(f"cannot build {arch} with model arguments {dict(model_args or {})}: {err}") from None
