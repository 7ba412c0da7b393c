"""AlexNet of the 2017 XNOR-Net ImageNet recipe and its float counterpart.

features:   0 Conv2d(3, 96, 11, stride 4) (float) -> 1 BatchNorm2d(96) -> 2 ReLU -> 3 MaxPool(3, 2)
            -> 4 BinConv2d(96, 256, 5, pad 2) -> 5 MaxPool(3, 2)
            -> 6 BinConv2d(256, 384, 3, pad 1) -> 7 BinConv2d(384, 384, 3, pad 1)
            -> 8 BinConv2d(384, 256, 3, pad 1) -> 9 MaxPool(3, 2)
classifier: 0 BinConv2d Linear(256*S*S, 4096) taking the 256xSxS map -> 1 BinConv2d Linear(4096, 4096, dropout 0.5)
            -> 2 BatchNorm1d(4096, eps 1e-3) -> 3 Dropout(0.5) -> 4 Linear(4096, classes) (float)

S follows from the input size: 227 gives the 2017 6x6 map (9216 features);
the smallest input is 67 (a 1x1 map), which the tests use.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn as nn

from xnornet import BinConv2d, ConvBlock, architectures

#: The 2017 input size and classifier width.
INPUT_SIZE = 227
HIDDEN_FEATURES = 4096
FEATURE_CHANNELS = 256


def _conv_out(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def feature_map_size(input_size: int) -> int:
    """Side of the last feature map for a square input (6 for 227); < 1 when too small."""
    size = _conv_out(input_size, 11, 4)  # features.0
    for _ in range(3):  # the three 3/2 max-pools; the binary convolutions keep the size
        size = _conv_out(size, 3, 2) if size >= 3 else 0
    return size


def smallest_input_size() -> int:
    """The smallest input side that still leaves a 1x1 feature map (67)."""
    size = 11
    while feature_map_size(size) < 1:
        size += 1
    return size


def init_2017(model: nn.Module) -> None:
    """The 2017 initialisation: each Conv2d/Linear weight ~ N(0, std = 1/c), c = elements per
    output filter; every BatchNorm2d weight = 1 (biases keep PyTorch's defaults)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.normal_(0.0, 1.0 / module.weight[0].numel())
            elif isinstance(module, nn.BatchNorm2d) and module.weight is not None:
                module.weight.fill_(1.0)


class AlexNet(nn.Module):
    """``block`` builds the binary layers (BinConv2d for XNOR, FloatConv2d for the float net)."""

    def __init__(
        self,
        block: Callable[..., ConvBlock] = BinConv2d,
        num_classes: int = 1000,
        input_size: int = INPUT_SIZE,
        hidden_features: int = HIDDEN_FEATURES,
    ) -> None:
        super().__init__()
        side = feature_map_size(input_size)
        if side < 1:
            raise ValueError(f"input size {input_size} is too small for AlexNet (smallest: {smallest_input_size()})")
        self.num_classes = num_classes
        self.input_size = input_size
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=11, stride=4, padding=0),
            nn.BatchNorm2d(96, eps=1e-4, momentum=0.1, affine=True),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            block(96, 256, kernel_size=5, stride=1, padding=2),
            nn.MaxPool2d(kernel_size=3, stride=2),
            block(256, 384, kernel_size=3, stride=1, padding=1),
            block(384, 384, kernel_size=3, stride=1, padding=1),
            block(384, FEATURE_CHANNELS, kernel_size=3, stride=1, padding=1),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.classifier = nn.Sequential(
            block(FEATURE_CHANNELS * side * side, hidden_features, Linear=True, previous_conv=True, size=side * side),
            block(hidden_features, hidden_features, dropout=0.5, Linear=True),
            nn.BatchNorm1d(hidden_features, eps=1e-3, momentum=0.1, affine=True),
            nn.Dropout(0.5),
            nn.Linear(hidden_features, num_classes),
        )
        init_2017(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # classifier.0 takes the feature map itself (previous_conv): its BatchNorm is per channel.
        return self.classifier(self.features(x))


#: --arch values: alexnet (XNOR, 2017), alexnet_float (same state_dict keys), alexnet_bwn, alexnet_K.
ARCHITECTURES: Dict[str, Callable[..., AlexNet]] = architectures("alexnet", AlexNet)


def build_model(
    arch: str, *, num_classes: int = 1000, input_size: int = INPUT_SIZE, hidden_features: int = HIDDEN_FEATURES
) -> AlexNet:
    return ARCHITECTURES[arch](num_classes=num_classes, input_size=input_size, hidden_features=hidden_features)
