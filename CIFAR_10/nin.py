"""Network-in-Network of the 2017 XNOR-Net CIFAR-10 recipe and its variants.

One ``nn.Sequential`` named ``xnor``, so state_dict keys match the 2017 files
(``xnor.0.weight``, ``xnor.3.bn.weight``, ...)::

     0 Conv2d(3, 192, 5, pad 2) float     8 block(192, 192, 1)
     1 BatchNorm2d(192, affine=False)     9 AvgPool2d(3, 2, 1)
     2 ReLU                              10 block(192, 192, 3, pad 1, dropout 0.5)
     3 block(192, 160, 1)                11 block(192, 192, 1)
     4 block(160,  96, 1)                12 BatchNorm2d(192, affine=False)
     5 MaxPool2d(3, 2, 1)                13 Conv2d(192, 10, 1) float
     6 block(96, 192, 5, pad 2, drop 0.5) 14 ReLU
     7 block(192, 192, 1)                15 AvgPool2d(8)

``block`` is :class:`~xnornet.BinConv2d` (XNOR), :class:`~xnornet.FloatConv2d`
(float counterpart, same keys) or a BinConv2d variant. As in 2017, the scale of
every affine BatchNorm (those of the blocks) is clamped to >= 0.01 at each
forward pass.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict

import torch
import torch.nn as nn

from xnornet import BinConv2d, ConvBlock, architectures
from xnornet.layers import BN_SCALE_FLOOR

#: The 2017 initialization: every Conv2d weight ~ N(0, INIT_STD), bias 0.
INIT_STD = 0.05


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-4, momentum=0.1, affine=False)


class NIN(nn.Module):
    """The 2017 NIN; ``block`` builds the eight middle layers."""

    def __init__(self, block: Callable[..., ConvBlock] = BinConv2d, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes
        block = partial(block, bn_scale_floor=BN_SCALE_FLOOR)
        self.xnor = nn.Sequential(
            nn.Conv2d(3, 192, kernel_size=5, stride=1, padding=2),
            _bn(192),
            nn.ReLU(inplace=True),
            block(192, 160, kernel_size=1, stride=1, padding=0),
            block(160, 96, kernel_size=1, stride=1, padding=0),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            block(96, 192, kernel_size=5, stride=1, padding=2, dropout=0.5),
            block(192, 192, kernel_size=1, stride=1, padding=0),
            block(192, 192, kernel_size=1, stride=1, padding=0),
            nn.AvgPool2d(kernel_size=3, stride=2, padding=1),
            block(192, 192, kernel_size=3, stride=1, padding=1, dropout=0.5),
            block(192, 192, kernel_size=1, stride=1, padding=0),
            _bn(192),
            nn.Conv2d(192, num_classes, kernel_size=1, stride=1, padding=0),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(kernel_size=8, stride=1, padding=0),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The affine BatchNorms are those of the blocks, which clamp their own scale (bn_scale_floor).
        return self.xnor(x).reshape(x.size(0), self.num_classes)


@torch.no_grad()
def init_weights(model: nn.Module, std: float = INIT_STD) -> None:
    """The 2017 initialization, chosen by module type: Conv2d weight ~ N(0, std), bias 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()


#: --arch values: nin (XNOR, 2017), nin_float, nin_bwn, nin_K.
ARCHITECTURES: Dict[str, Callable[[], nn.Module]] = architectures("nin", NIN)


def build_model(arch: str) -> nn.Module:
    return ARCHITECTURES[arch]()


#: One CIFAR-10 image (channels, height, width), as the network takes it.
INPUT_SHAPE = (3, 32, 32)


if __name__ == "__main__":  # python CIFAR_10/nin.py [--arch NAME]: the per-layer summary
    from xnornet.summary import summary_cli

    summary_cli(ARCHITECTURES, INPUT_SHAPE, default="nin")
