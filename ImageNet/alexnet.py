"""AlexNet of the 2017 XNOR-Net ImageNet recipe and its float counterpart.

features:   0 Conv2d(3, 96, 11, stride 4) (float) -> 1 BatchNorm2d(96) -> 2 ReLU -> 3 MaxPool(3, 2)
            -> 4 BinConv2d(96, 256, 5, pad 2) -> 5 MaxPool(3, 2)
            -> 6 BinConv2d(256, 384, 3, pad 1) -> 7 BinConv2d(384, 384, 3, pad 1)
            -> 8 BinConv2d(384, 256, 3, pad 1) -> 9 MaxPool(3, 2)
flatten:    the 256xSxS map -> 256*S*S features (channel-major, as the 2017 ``view``)
classifier: 0 BinConv2d Linear(256*S*S, 4096), BatchNorm1d(256*S*S) -> 1 BinConv2d Linear(4096, 4096, dropout 0.5)
            -> 2 BatchNorm1d(4096, eps 1e-3) -> 3 Dropout(0.5) -> 4 Linear(4096, classes) (float)

S follows from the input size: 227 gives the 2017 6x6 map (9216 features, so
``classifier.0.bn`` holds one mean, variance, scale and shift per feature, as in
the 2017 files); the smallest input is 67 (a 1x1 map), which the tests use.
Unlike the 2017 LeNet-5 and NIN, the 2017 AlexNet does not clamp its BatchNorm
scales, so they may become negative in training (``bn_scale_floor=None``).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from xnornet import BinConv2d, ConvBlock, architectures

#: The 2017 input size and classifier width.
INPUT_SIZE = 227
HIDDEN_FEATURES = 4096
FEATURE_CHANNELS = 256
#: The 2017 AlexNet leaves its BatchNorm scales unclamped (LeNet-5 and NIN clamp them to >= 0.01).
BN_SCALE_FLOOR: Optional[float] = None
#: Initial weights ~ N(0, std = scale / c): scale 1 in the 2017 commit whose run on the Caffe
#: data gave top-1 44.87%, scale 2 in the final 2017 code (its torchvision run).
INIT_SCALE_CAFFE_RUN = 1.0
INIT_SCALE_FINAL = 2.0


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


def init_2017(model: nn.Module, scale: float = INIT_SCALE_FINAL) -> None:
    """The 2017 initialisation: each Conv2d/Linear weight ~ N(0, std = scale / c), c = elements per
    output filter (``scale`` 1 or 2, see :data:`INIT_SCALE_CAFFE_RUN`); every BatchNorm2d weight 1,
    bias 0; every affine BatchNorm1d weight ~ U(0, 1), bias 0, the PyTorch 0.2-0.4 default that the
    2017 code kept for BatchNorm1d (it reset only BatchNorm2d). Conv2d/Linear biases keep PyTorch's
    default, the same then and now."""
    if not scale > 0:
        raise ValueError(f"the initialisation scale must be > 0, got {scale}")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.normal_(0.0, scale / module.weight[0].numel())
            elif isinstance(module, nn.BatchNorm2d) and module.affine:
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, nn.BatchNorm1d) and module.affine:
                module.weight.uniform_(0.0, 1.0)
                module.bias.zero_()


class AlexNet(nn.Module):
    """``block`` builds the binary layers (BinConv2d for XNOR, FloatConv2d for the float net);
    ``init_scale`` chooses the 2017 initialisation (:func:`init_2017`)."""

    def __init__(
        self,
        block: Callable[..., ConvBlock] = BinConv2d,
        num_classes: int = 1000,
        input_size: int = INPUT_SIZE,
        hidden_features: int = HIDDEN_FEATURES,
        init_scale: float = INIT_SCALE_FINAL,
    ) -> None:
        super().__init__()
        side = feature_map_size(input_size)
        if side < 1:
            raise ValueError(f"input size {input_size} is too small for AlexNet (smallest: {smallest_input_size()})")
        self.num_classes = num_classes
        self.input_size = input_size
        block = partial(block, bn_scale_floor=BN_SCALE_FLOOR)
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
            block(FEATURE_CHANNELS * side * side, hidden_features, Linear=True),
            block(hidden_features, hidden_features, dropout=0.5, Linear=True),
            nn.BatchNorm1d(hidden_features, eps=1e-3, momentum=0.1, affine=True),
            nn.Dropout(0.5),
            nn.Linear(hidden_features, num_classes),
        )
        init_2017(self, init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Flattened first, as in 2017: classifier.0's BatchNorm1d normalizes each of the 256*S*S features.
        return self.classifier(torch.flatten(self.features(x), 1))


#: --arch values: alexnet (XNOR, 2017), alexnet_float (same state_dict keys), alexnet_bwn, alexnet_K.
ARCHITECTURES: Dict[str, Callable[..., AlexNet]] = architectures("alexnet", AlexNet)


def build_model(
    arch: str, *, num_classes: int = 1000, input_size: int = INPUT_SIZE, hidden_features: int = HIDDEN_FEATURES,
    init_scale: float = INIT_SCALE_FINAL,
) -> AlexNet:
    """A freshly initialised network of ``--arch arch`` (see :class:`AlexNet`)."""
    return ARCHITECTURES[arch](num_classes=num_classes, input_size=input_size, hidden_features=hidden_features,
                              init_scale=init_scale)
