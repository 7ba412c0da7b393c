"""xnornet: the shared XNOR-Net binarization core (Rastegari et al., 2016).

The three recipes (MNIST/, CIFAR_10/, ImageNet/) import it; equations are
derived in notes/notes.md.
"""

from .binarize import BinActive, bin_active, binary_sign
from .binop import BinOp, binarize_weight, center_and_clamp, filter_alpha, legacy_grad_factor, scaled_sign_grad
from .layers import BLOCK_VARIANTS, BinConv2d, ConvBlock, FloatConv2d, architectures

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
