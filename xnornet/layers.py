"""The XNOR-Net block: BatchNorm -> BinActive -> (Dropout) -> Conv2d/Linear -> ReLU.

Submodule names (``bn``, ``conv`` or ``linear``, ``dropout``, ``relu``) and the
constructor arguments follow the 2017 code, so state_dict keys of the three
networks match the 2017 checkpoints.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .binarize import bin_active

#: The floor the 2017 LeNet-5 and NIN put on the scale of every affine BatchNorm at the start
#: of each forward pass (the 2017 AlexNet has no such clamp). It keeps BN followed by sign
#: increasing in its input: a negative scale would flip the sign.
BN_SCALE_FLOOR = 0.01


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose mask comes from one uniform draw per element (``rand >= p``).

    The same distribution as ``nn.Dropout`` (keep with probability ``1 - p``, scale the kept
    values by ``1 / (1 - p)``), but drawn several times faster on the CPU than the
    Bernoulli sampler ``nn.Dropout`` uses; the mask keeps the input's memory format.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return x * 0
        keep = torch.rand_like(x, dtype=torch.float32) >= self.p
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


class ConvBlock(nn.Module):
    """BatchNorm -> activation -> optional Dropout -> Conv2d or Linear -> ReLU.

    The activation is the identity here; :class:`BinConv2d` binarizes it.
    ``Linear=True`` with ``previous_conv=True`` takes the feature map of a
    convolution: the BatchNorm normalizes its ``input_channels // size``
    channels (``size`` = height * width) before flattening.

    ``bn_scale_floor`` (keyword-only): clamp the BatchNorm scale in place to at
    least this value before each forward pass, as the 2017 LeNet-5 and NIN did
    for every affine BatchNorm (:data:`BN_SCALE_FLOOR`); ``None`` (the default,
    the 2017 block itself and the 2017 AlexNet) leaves the scale free, negative
    values included. Each network sets it for its blocks.
    """

    def __init__(
        self,
        input_channels: int,
        output_channels: int,
        kernel_size: int = -1,
        stride: int = -1,
        padding: int = -1,
        groups: int = 1,
        dropout: float = 0,
        Linear: bool = False,  # noqa: N803  (2017 spelling)
        previous_conv: bool = False,
        size: int = 0,
        *,
        bn_scale_floor: Optional[float] = None,
    ) -> None:
        super().__init__()
        if bn_scale_floor is not None and not math.isfinite(bn_scale_floor):
            raise ValueError(f"bn_scale_floor must be a finite number or None, got {bn_scale_floor}")
        self.bn_scale_floor = bn_scale_floor
        self.input_channels = input_channels
        self.output_channels = output_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.groups = groups
        self.dropout_ratio = dropout
        self.Linear = Linear
        self.previous_conv = previous_conv
        self.size = size
        if dropout != 0:
            self.dropout = Dropout(dropout)
        if not Linear:
            if kernel_size <= 0 or stride <= 0 or padding < 0:
                raise ValueError("a convolution block needs kernel_size > 0, stride > 0 and padding >= 0")
            self.bn: nn.Module = nn.BatchNorm2d(input_channels, eps=1e-4, momentum=0.1, affine=True)
            self.conv = nn.Conv2d(
                input_channels, output_channels, kernel_size=kernel_size, stride=stride, padding=padding, groups=groups
            )
        else:
            if previous_conv:
                if size <= 0 or input_channels % size != 0:
                    raise ValueError("previous_conv=True needs size = height * width dividing input_channels")
                self.bn = nn.BatchNorm2d(input_channels // size, eps=1e-4, momentum=0.1, affine=True)
            else:
                self.bn = nn.BatchNorm1d(input_channels, eps=1e-4, momentum=0.1, affine=True)
            self.linear = nn.Linear(input_channels, output_channels)
        self.relu = nn.ReLU(inplace=True)

    @property
    def weight_layer(self) -> nn.Module:
        """The Conv2d or Linear whose weight this block uses."""
        return self.linear if self.Linear else self.conv

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        """The activation between BatchNorm and the weight layer."""
        return x

    def apply_weights(self, x: torch.Tensor, normalized: torch.Tensor) -> torch.Tensor:
        """Run the conv/linear on ``x`` (``normalized`` is the BatchNorm output)."""
        if not self.Linear:
            return self.conv(x)
        return self.linear(x.reshape(x.size(0), self.input_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn_scale_floor is not None:
            with torch.no_grad():
                # In place under no_grad on purpose: the 2017 LeNet-5 and NIN keep the
                # BN scale positive by clamping the parameter itself, not a copy.
                self.bn.weight.clamp_(min=self.bn_scale_floor)
        normalized = self.bn(x)
        x = self.activate(normalized)
        if self.dropout_ratio != 0:
            x = self.dropout(x)
        x = self.apply_weights(x, normalized)
        return self.relu(x)


class FloatConv2d(ConvBlock):
    """The float counterpart of :class:`BinConv2d`: same block, same keys, real values.

    :class:`BinOp` never touches it (it selects :class:`BinConv2d` by type).
    """


class BinConv2d(ConvBlock):
    """XNOR-Net block with binarized input activations and (via BinOp) binarized weights.

    Extra options (keyword-only; the defaults reproduce the 2017 code):

    - ``binary_activations=False``: BWN, binary weights with real activations.
    - ``activation_scale=True``: the paper's scale K, eq. (12): ``A`` = mean of
      ``|x|`` over channels, averaged over each kernel window (box filter with the
      conv's stride and zero padding), multiplies the binary convolution before
      the bias. For a linear block, K is the mean of ``|x|`` per sample.
      Gradients flow through K by autograd.
    """

    def __init__(self, *args: Any, binary_activations: bool = True, activation_scale: bool = False, **kwargs: Any) -> None:
        """The 2017 arguments of :class:`ConvBlock`, then the keyword-only options above."""
        super().__init__(*args, **kwargs)
        self.binary_activations = binary_activations
        self.activation_scale = activation_scale

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        return bin_active(x) if self.binary_activations else x

    def scale_map(self, normalized: torch.Tensor) -> torch.Tensor:
        """Eq. (12): the activation scale K for the BatchNorm output ``normalized``."""
        if self.Linear:
            return normalized.abs().reshape(normalized.size(0), -1).mean(dim=1, keepdim=True)
        channel_mean = normalized.abs().mean(dim=1, keepdim=True)
        return F.avg_pool2d(
            channel_mean, self.kernel_size, stride=self.stride, padding=self.padding, count_include_pad=True
        )

    def apply_weights(self, x: torch.Tensor, normalized: torch.Tensor) -> torch.Tensor:
        if not self.activation_scale:
            return super().apply_weights(x, normalized)
        layer = self.weight_layer
        if self.Linear:
            out = F.linear(x.reshape(x.size(0), self.input_channels), layer.weight)
        else:
            out = F.conv2d(x, layer.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        out = out * self.scale_map(normalized)
        if layer.bias is not None:
            bias_shape = (1, -1) if self.Linear else (1, -1, 1, 1)
            out = out + layer.bias.reshape(bias_shape)
        return out


#: The block of each network variant, by ``--arch`` suffix: XNOR as in 2017, its float
#: counterpart, BWN (binary weights only) and XNOR with the activation scale K.
BLOCK_VARIANTS: Dict[str, Callable[..., ConvBlock]] = {
    "": BinConv2d,
    "_float": FloatConv2d,
    "_bwn": partial(BinConv2d, binary_activations=False),
    "_K": partial(BinConv2d, activation_scale=True),
}


def architectures(base_name: str, network: Callable[..., nn.Module]) -> Dict[str, Callable[..., nn.Module]]:
    """``--arch`` name -> constructor for each block variant of ``network(block, **kwargs)``."""
    return {base_name + suffix: partial(network, block) for suffix, block in BLOCK_VARIANTS.items()}
