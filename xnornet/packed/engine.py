"""The packed inference engine: BinConv2d blocks replaced by XNOR-popcount modules.

:func:`pack_model` walks a model and replaces every :class:`~xnornet.layers.BinConv2d`
(chosen by type, wherever it sits) by a :class:`PackedBinConv2d`; every other
module (first and last layers, pools, plain BatchNorm) stays float. The result
is an inference-only model (eval mode, no gradients) whose outputs equal the
simulated model's (BinOp binarization + float conv) up to float rounding.

Per block, in the packed module:

- XNOR blocks: ``sign(bn(x))`` is ``x >= t`` with the exact float32 threshold of
  :func:`~xnornet.packed.pack.sign_thresholds`, fused with the bit packing; then
  ``relu(alpha * dot + bias)`` with ``dot`` from XNOR-popcount (eq. 13, 14).
- XNOR blocks with the activation scale K (eq. 12): the BatchNorm output is
  computed in float (K needs it), K by the block's own ``scale_map``, then
  ``relu(alpha * dot * K + bias)``.
- BWN blocks (binary weights, real activations): nothing to XNOR; the weights
  are stored packed and run as a float conv of ``alpha * sign`` (not faster).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cli import UserError
from ..layers import BinConv2d
from . import kernels
from .pack import (
    clamped_batchnorm,
    pack_dense,
    padding_offsets,
    runtime_weight,
    sign_thresholds,
    unpack_dense,
    weight_signs_and_alpha,
    words_for,
)

LOG = logging.getLogger("xnornet")

#: Block kinds: XNOR (binary activations), XNOR with the activation scale K, BWN.
XNOR, XNOR_K, BWN = "xnor", "xnor_k", "bwn"


@dataclass(frozen=True)
class BlockConfig:
    """The hyperparameters of a BinConv2d block that the packed module needs."""

    kind: str
    input_channels: int
    output_channels: int
    kernel_size: int
    stride: int
    padding: int
    groups: int
    linear: bool
    previous_conv: bool
    size: int

    @classmethod
    def from_block(cls, block: BinConv2d) -> "BlockConfig":
        if not block.binary_activations:
            kind = BWN
        else:
            kind = XNOR_K if block.activation_scale else XNOR
        return cls(
            kind=kind, input_channels=block.input_channels, output_channels=block.output_channels,
            kernel_size=1 if block.Linear else block.kernel_size, stride=1 if block.Linear else block.stride,
            padding=0 if block.Linear else block.padding, groups=1 if block.Linear else block.groups,
            linear=bool(block.Linear), previous_conv=bool(block.previous_conv), size=int(block.size),
        )

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)

    @property
    def weight_shape(self) -> tuple:
        if self.linear:
            return (self.output_channels, self.input_channels)
        return (self.output_channels, self.input_channels // self.groups, self.kernel_size, self.kernel_size)

    @property
    def bn_channels(self) -> int:
        return self.input_channels // self.size if self.linear and self.previous_conv else self.input_channels


class PackedBinConv2d(nn.Module):
    """Inference-only replacement of a :class:`BinConv2d` block (see the module docstring).

    Buffers (what the packed file stores): ``weight_bits`` (the dense sign bits of
    :mod:`~xnornet.packed.pack`, int64 words), ``alpha`` and ``bias`` [O] float32,
    ``threshold`` [C] float32 (XNOR blocks); K and BWN blocks keep their BatchNorm
    as the submodule ``bn``.
    """

    def __init__(
        self,
        config: BlockConfig,
        weight_bits: torch.Tensor,
        alpha: torch.Tensor,
        bias: torch.Tensor,
        threshold: Optional[torch.Tensor] = None,
        bn: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.config = config
        # ConvBlock's attribute names, so that BinConv2d.scale_map (eq. 12) applies to this module too.
        self.Linear, self.kernel_size = config.linear, config.kernel_size
        self.stride, self.padding = config.stride, config.padding
        expected = words_for(int(np.prod(config.weight_shape)))
        if weight_bits.numel() != expected:
            raise ValueError(f"weight_bits holds {weight_bits.numel()} words, {config.weight_shape} needs {expected}")
        for name, value, length in (("alpha", alpha, config.output_channels), ("bias", bias, config.output_channels)):
            if value.numel() != length:
                raise ValueError(f"{name} has {value.numel()} values, expected {length}")
        self.register_buffer("weight_bits", weight_bits.reshape(-1).to(torch.int64).contiguous())
        self.register_buffer("alpha", alpha.reshape(-1).float().contiguous())
        self.register_buffer("bias", bias.reshape(-1).float().contiguous())
        if config.kind == XNOR:
            if threshold is None or threshold.numel() != config.bn_channels:
                raise ValueError(f"an XNOR block needs {config.bn_channels} thresholds")
            self.register_buffer("threshold", threshold.reshape(-1).float().contiguous())
        else:
            if bn is None:
                raise ValueError(f"a {config.kind} block needs its BatchNorm")
            self.bn = bn.eval()
        signs = unpack_dense(self.weight_bits.numpy().view(np.uint64), config.weight_shape)
        if config.kind == BWN:
            sign_values = torch.from_numpy(signs.astype(np.float32) * 2 - 1)
            self._float_weight = sign_values * self.alpha.reshape((-1,) + (1,) * (sign_values.dim() - 1))
        else:
            self._kernel_weight, self._tap_ones = runtime_weight(signs, config.groups)
            self._offsets: Dict[tuple, np.ndarray] = {}
            zero = np.zeros(config.bn_channels, np.float32)
            channel_thresholds = self.threshold.numpy() if config.kind == XNOR else zero
            self._feature_thresholds = (
                np.repeat(channel_thresholds, config.size) if config.linear and config.previous_conv
                else channel_thresholds
            )
        self.eval()

    @classmethod
    def from_block(cls, block: BinConv2d) -> "PackedBinConv2d":
        """Pack a trained block: BinOp's weight transform, exact sign thresholds, bias."""
        config = BlockConfig.from_block(block)
        layer = block.weight_layer
        signs, alpha = weight_signs_and_alpha(layer.weight)
        bias = layer.bias.detach().float() if layer.bias is not None else torch.zeros(config.output_channels)
        bn = clamped_batchnorm(block.bn)
        threshold = torch.from_numpy(sign_thresholds(bn)) if config.kind == XNOR else None
        return cls(config, torch.from_numpy(pack_dense(signs).view(np.int64)), torch.from_numpy(alpha),
                   bias.clone(), threshold=threshold, bn=None if config.kind == XNOR else bn)

    def extra_repr(self) -> str:
        c = self.config
        if c.linear:
            return f"{c.kind}, linear {c.input_channels} -> {c.output_channels}"
        return (f"{c.kind}, {c.input_channels} -> {c.output_channels}, kernel {c.kernel_size}, "
                f"stride {c.stride}, padding {c.padding}, groups {c.groups}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("PackedBinConv2d is inference-only: call model.eval()")
        with torch.no_grad():
            if self.config.kind == BWN:
                return self._forward_float(x)
            scale = None
            if self.config.kind == XNOR_K:
                x = self.bn(x)  # K needs the float BatchNorm output; its sign is then taken at 0
                # One implementation of eq. (12): the block's own method, on this module's attributes.
                scale = BinConv2d.scale_map(self, x)  # type: ignore[arg-type]
            kernels.sync_threads(torch.get_num_threads())
            return self._xnor(self._pack_input(x), scale, x.shape[0])

    def _pack_input(self, x: torch.Tensor) -> np.ndarray:
        """Sign bits of ``x`` (``x >= threshold``), zero-padded: ``[N, H + 2p, W + 2p, G, CW]``.

        A linear block is a 1x1 convolution over a ``1 x N`` image of feature vectors.
        """
        c = self.config
        x = x.float()
        if c.linear:
            rows = x.reshape(x.shape[0], c.input_channels).contiguous()
            x = rows.reshape(1, 1, rows.shape[0], c.input_channels).permute(0, 3, 1, 2)  # [1, F, 1, N]
        elif x.dim() != 4 or x.shape[1] != c.input_channels:
            raise ValueError(f"expected an input [N, {c.input_channels}, H, W], got {list(x.shape)}")
        n_batch, _, height, width = x.shape
        words = words_for(c.input_channels // c.groups)
        packed = np.zeros((n_batch, height + 2 * c.padding, width + 2 * c.padding, c.groups, words), np.int64)
        nhwc = x.permute(0, 2, 3, 1)
        if nhwc.is_contiguous():  # channels-last memory, as packed blocks return
            kernels.pack_nhwc(nhwc.numpy(), self._feature_thresholds, c.groups, c.padding, packed, work=x.numel())
        else:
            kernels.pack_nchw(x.contiguous().numpy(), self._feature_thresholds, c.groups, c.padding, packed,
                              work=x.numel())
        return packed

    def _xnor(self, packed: np.ndarray, scale: Optional[torch.Tensor], n_batch: int) -> torch.Tensor:
        """``relu(alpha * dot * K + bias)`` from packed inputs, as a channels-last NCHW tensor (or [N, O])."""
        c = self.config
        height, width = packed.shape[1] - 2 * c.padding, packed.shape[2] - 2 * c.padding
        out_h = (height + 2 * c.padding - c.kernel_size) // c.stride + 1
        out_w = (width + 2 * c.padding - c.kernel_size) // c.stride + 1
        if out_h <= 0 or out_w <= 0:
            raise ValueError(f"an input of {height}x{width} is smaller than the {c.kernel_size}x{c.kernel_size} kernel")
        out = np.empty((packed.shape[0], out_h, out_w, c.output_channels), np.float32)
        scale_array = kernels.empty_scale() if scale is None else np.ascontiguousarray(
            scale.float().numpy()).reshape(packed.shape[0], out_h, out_w)
        kernels.xnor_conv(packed, self._kernel_weight, self._offset_table(height, width), c.stride,
                          c.kernel_size, c.kernel_size, self.alpha.numpy(), self.bias.numpy(), scale_array, out,
                          work=out.size * self._kernel_weight.shape[2])
        result = torch.from_numpy(out)
        if c.linear:
            return result.reshape(n_batch, c.output_channels)
        return result.permute(0, 3, 1, 2)  # NCHW view of channels-last memory

    def _offset_table(self, height: int, width: int) -> np.ndarray:
        """The padding correction of eq. (14) for an input of ``height x width`` (cached)."""
        key = (height, width)
        if key not in self._offsets:
            c = self.config
            self._offsets[key] = padding_offsets(self._tap_ones, c.input_channels // c.groups, height, width,
                                                 c.kernel_size, c.stride, c.padding)
        return self._offsets[key]

    def _forward_float(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = self.bn(x)
        if c.linear:
            out = F.linear(x.reshape(x.shape[0], c.input_channels), self._float_weight, self.bias)
        else:
            out = F.conv2d(x, self._float_weight, self.bias, c.stride, c.padding, 1, c.groups)
        return F.relu(out)


def pack_model(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every BinConv2d replaced by a :class:`PackedBinConv2d`.

    The weights are binarized as they are stored, as BinOp's next ``binarization()``
    would do. Pack before running the simulated model: ``BinOp.restore()`` leaves the
    centred-and-clamped weights behind, and centring them again is not bit-exact.
    """
    packed = copy.deepcopy(model).eval()
    for name, module in list(packed.named_modules()):
        if isinstance(module, BinConv2d):
            replace_module(packed, name, PackedBinConv2d.from_block(module))
    return packed.eval()


def pack_for_evaluation(model: nn.Module, device: torch.device) -> nn.Module:
    """``--evaluate --packed``: the packed copy of a loaded model; the engine runs on the CPU only."""
    if device.type != "cpu":
        raise UserError(f"--packed runs on the CPU, not {device.type}: add --no-cuda")
    packed = pack_model(model)
    count = sum(isinstance(module, PackedBinConv2d) for module in packed.modules())
    if count == 0:
        raise UserError("--packed: the model has no BinConv2d block to pack (a float architecture?)")
    LOG.info("evaluating through the packed XNOR-popcount engine (%d blocks packed)", count)
    return packed


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
