"""LeNet-5 of the 2017 XNOR-Net MNIST recipe and its variants.

conv1 (1->20, 5x5, float) -> BN (affine=False) -> ReLU -> maxpool 2
-> BinConv2d(20->50, 5x5) -> maxpool 2
-> BinConv2d Linear(800->500, previous_conv, size 16) -> Linear(500->10, float)

As in 2017, the scale of every affine BatchNorm (those of the two blocks) is
clamped to >= 0.01 at each forward pass.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn as nn

from xnornet import BinConv2d, ConvBlock, architectures
from xnornet.layers import BN_SCALE_FLOOR


class LeNet_5(nn.Module):  # noqa: N801  (2017 name; also the --arch value)
    """``block`` builds the two middle layers: BinConv2d (XNOR, BWN, K) or FloatConv2d."""

    def __init__(self, block: Callable[..., ConvBlock] = BinConv2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5, stride=1)
        self.bn_conv1 = nn.BatchNorm2d(20, eps=1e-4, momentum=0.1, affine=False)
        self.relu_conv1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.bin_conv2 = block(20, 50, kernel_size=5, stride=1, padding=0, bn_scale_floor=BN_SCALE_FLOOR)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.bin_ip1 = block(50 * 4 * 4, 500, Linear=True, previous_conv=True, size=4 * 4,
                             bn_scale_floor=BN_SCALE_FLOOR)
        self.ip2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu_conv1(self.bn_conv1(self.conv1(x))))
        x = self.pool2(self.bin_conv2(x))
        x = self.bin_ip1(x)
        return self.ip2(x)


#: --arch values: LeNet_5 (XNOR, 2017), LeNet_5_float, LeNet_5_bwn, LeNet_5_K.
ARCHITECTURES: Dict[str, Callable[[], nn.Module]] = architectures("LeNet_5", LeNet_5)


def build_model(arch: str) -> nn.Module:
    return ARCHITECTURES[arch]()


#: One MNIST image (channels, height, width), as the network takes it.
INPUT_SHAPE = (1, 28, 28)


if __name__ == "__main__":  # python MNIST/lenet.py [--arch NAME]: the per-layer summary
    from xnornet.summary import summary_cli

    summary_cli(ARCHITECTURES, INPUT_SHAPE, default="LeNet_5")
