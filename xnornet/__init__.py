"""xnornet: the shared XNOR-Net binarization core (Rastegari et al., 2016).

The three recipes (MNIST/, CIFAR_10/, ImageNet/) import it; equations are
derived in notes/notes.md.
"""

import importlib
from typing import Any

#: Where each public name lives. They are imported on first use (PEP 562), so that the
#: command-line tools that need no torch (python -m xnornet.summarize, xnornet.plot) start
#: at once; ``from xnornet import BinOp`` works as before.
_EXPORTS = {
    "BinActive": "binarize", "bin_active": "binarize", "binary_sign": "binarize",
    "BinOp": "binop", "binarize_weight": "binop", "center_and_clamp": "binop", "filter_alpha": "binop",
    "legacy_grad_factor": "binop", "scaled_sign_grad": "binop",
    "BLOCK_VARIANTS": "layers", "BinConv2d": "layers", "ConvBlock": "layers", "FloatConv2d": "layers",
    "architectures": "layers",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "BLOCK_VARIANTS",
    "architectures",
    "BinActive",
    "BinConv2d",
    "BinOp",
    "ConvBlock",
    "FloatConv2d",
    "bin_active",
    "binarize_weight",
    "binary_sign",
    "center_and_clamp",
    "filter_alpha",
    "legacy_grad_factor",
    "scaled_sign_grad",
]

__version__ = "0.1.0"
