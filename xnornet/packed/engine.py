"""The packed inference engine: BinConv2d blocks replaced by XNOR-popcount modules.

:func:`pack_model` walks a model and replaces every :class:`~xnornet.layers.BinConv2d`
(chosen by type, wherever it sits) by a :class:`PackedBinConv2d`; every other
module (first and last layers, pools, plain BatchNorm) stays float. The result
is an inference-only model (eval mode, no gradients) whose outputs equal the
simulated model's (BinOp binarization + float conv) up to float rounding.

Per block, in the packed module:

- XNOR blocks: ``sign(bn(x))`` is ``x >= t`` with the exact float32 threshold of
  :func:`~xnornet.packed.pack.sign_thresholds`, fused with the bit packing; then
  ``relu(alpha * dot + bias)`` with ``dot`` from XNOR-popcount (eq. 13, 14). In a
  channel whose BatchNorm scale is negative (AlexNet leaves its scales unclamped)
  ``x >= t`` is the inverted sign and the stored weights of that channel are
  inverted too, so every product, and ``dot``, is unchanged.
- XNOR blocks with the activation scale K (eq. 12): the BatchNorm output is
  computed in float (K needs it), K by the block's own ``scale_map``, then
  ``relu(alpha * dot * K + bias)``.
- BWN blocks (binary weights, real activations): nothing to XNOR; the weights
  are stored packed and run as a float conv of ``alpha * sign`` (not faster).
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cli import UserError
from ..layers import BinConv2d
from . import kernels
from .pack import (
    block_batchnorm,
    decreasing_channels,
    flip_input_signs,
    integer_limits,
    merges_kernel_rows,
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
#: Call plans (with their scratch buffers) a block keeps before it starts afresh.
MAX_PLANS = 16


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

    def signature(self) -> str:
        """One short line naming every field, e.g. ``xnor conv 192->160 k1 s1 p0 g1`` (the file stores it)."""
        if self.linear:
            source = f" from a map of {self.size}" if self.previous_conv else ""
            return f"{self.kind} linear {self.input_channels}->{self.output_channels}{source}"
        return (f"{self.kind} conv {self.input_channels}->{self.output_channels} k{self.kernel_size} "
                f"s{self.stride} p{self.padding} g{self.groups}")

    @property
    def weight_shape(self) -> tuple:
        if self.linear:
            return (self.output_channels, self.input_channels)
        return (self.output_channels, self.input_channels // self.groups, self.kernel_size, self.kernel_size)

    @property
    def bn_channels(self) -> int:
        return self.input_channels // self.size if self.linear and self.previous_conv else self.input_channels


@dataclass
class PackedActivations:
    """Sign bits passed from one packed block to the next, never leaving the bit domain.

    ``words`` is ``[N, H + 2 padding, W + 2 padding, 1, ceil(channels / 64)]`` int64
    (the kernels' layout, zero padding ring).
    """

    words: np.ndarray
    padding: int
    channels: int

    @property
    def shape(self) -> tuple:
        """``[N, C, H, W]`` of the activations these bits stand for."""
        n, height, width = self.words.shape[:3]
        return (n, self.channels, height - 2 * self.padding, width - 2 * self.padding)

    def clone(self) -> "PackedActivations":
        return PackedActivations(self.words.copy(), self.padding, self.channels)


@dataclass(frozen=True)
class CallPlan:
    """What a packed block's forward works out once per input layout, shape, thread count and
    calling Python thread: the buffer shapes and the fixed arguments of its kernel call (the
    padding correction, the work split, which steps run in parallel), and the scratch buffers the
    call reuses. A forward at batch 1 takes tens of microseconds; redoing this arithmetic in
    Python, or allocating and zeroing fresh scratch arrays, took a part of it on every call."""

    out_shape: Tuple[int, ...]  # [N, Ho, Wo, O] float output, or [N, Ho, Wo, 0] for a bit output
    bits_shape: Tuple[int, ...]  # () unless the block emits bits
    parallel: bool  # some step runs on several threads
    constants: tuple  # :func:`~xnornet.packed.kernels.xnor_block`'s arguments from ``threshold`` on
    # Scratch, rewritten by every call: the packed float input [N, H + 2p, W + 2p, G, CW] (its zero
    # padding ring is never written) and the merged kernel rows (zeroed row by row by the kernel);
    # an empty array where the block has none.
    packed: np.ndarray
    merged: np.ndarray
    no_output: np.ndarray  # a bit-emitting block's empty float output [N, Ho, Wo, 0] (read for its shape)

    @classmethod
    def make(cls, block: "PackedBinConv2d", layout: str, shape: Tuple[int, ...], threads: int) -> "CallPlan":
        c = block.config
        if layout == "bits":
            images, height, width = shape[0], shape[1] - 2 * c.padding, shape[2] - 2 * c.padding
        else:
            images, height, width = (shape[0], shape[1], shape[2]) if layout == "nhwc" else (
                shape[0], shape[2], shape[3])
        out_h = (height + 2 * c.padding - c.kernel_size) // c.stride + 1
        out_w = (width + 2 * c.padding - c.kernel_size) // c.stride + 1
        if out_h <= 0 or out_w <= 0:
            raise ValueError(f"an input of {height}x{width} is smaller than the {c.kernel_size}x{c.kernel_size} kernel")
        group_channels = c.input_channels // c.groups
        packed_shape = (images, height + 2 * c.padding, width + 2 * c.padding, c.groups, words_for(group_channels))
        merged_shape = packed_shape[:2] + (out_w, c.groups, words_for(c.kernel_size * group_channels))
        pack = kernels.pack_nhwc if layout == "nhwc" else kernels.pack_nchw
        pack_parallel = layout != "bits" and pack.runs_parallel(int(np.prod(shape)), threads)
        merge_parallel = block._merge_rows and kernels.merge_kernel_rows.runs_parallel(
            int(np.prod(packed_shape)), threads)
        conv_parallel = kernels.xnor_conv.runs_parallel(
            kernels.conv_work(images, out_h, out_w, c.output_channels, block._kernel_weight), threads)
        ring = block.output_padding
        constants = (block._feature_thresholds, c.groups, c.padding, c.kernel_size, group_channels, pack_parallel,
                     merge_parallel, conv_parallel, block._kernel_weight, block._offset_table(height, width),
                     c.stride, c.kernel_size, 1 if block._merge_rows else c.kernel_size,  # merged: 1-wide taps
                     block._alpha, block._bias, block._limit, ring or 0,
                     kernels.rows_per_job(out_h, images, threads, conv_parallel),
                     kernels.rows_per_job(height, images, threads, pack_parallel, kernels.PACK_JOBS_PER_THREAD),
                     kernels.usable_threads(threads) if conv_parallel else 1)
        out_shape = (images, out_h, out_w, 0 if ring is not None else c.output_channels)
        return cls(out_shape,
                   () if ring is None else (images, out_h + 2 * ring, out_w + 2 * ring, 1,
                                            words_for(c.output_channels)),
                   pack_parallel or merge_parallel or conv_parallel, constants,
                   block._no_bits if layout == "bits" else np.zeros(packed_shape, np.int64),
                   np.empty(merged_shape, np.int64) if block._merge_rows else block._no_bits,
                   np.empty(out_shape if ring is not None else (0, 0, 0, 0), np.float32))


class PackedBinConv2d(nn.Module):
    """Inference-only replacement of a :class:`BinConv2d` block (see the module docstring).

    Buffers (what the packed file stores): ``weight_bits`` (the dense sign bits of
    :mod:`~xnornet.packed.pack`, int64 words; in an XNOR block, inverted for the input
    channels whose BatchNorm scale is negative, :func:`~xnornet.packed.pack.flip_input_signs`) and

    - the input side: ``threshold`` [C] float32, the exact sign thresholds (XNOR
      blocks fed a float tensor); none for a block fed bits by the previous one;
      K and BWN blocks keep their BatchNorm as the submodule ``bn``;
    - the output side: ``alpha`` and ``bias`` [O] float32 (float output), or
      ``output_limit`` [O] int16/int32 for a block that emits the next block's sign
      bits (``dot >= output_limit``, :func:`~xnornet.packed.pack.integer_limits`),
      with ``output_padding`` the padding ring the next layer needs.
    """

    def __init__(
        self,
        config: BlockConfig,
        weight_bits: torch.Tensor,
        alpha: Optional[torch.Tensor] = None,
        bias: Optional[torch.Tensor] = None,
        threshold: Optional[torch.Tensor] = None,
        bn: Optional[nn.Module] = None,
        output_limit: Optional[torch.Tensor] = None,
        output_padding: Optional[int] = None,
        bit_input: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        # ConvBlock's attribute names, so that BinConv2d.scale_map (eq. 12) applies to this module too.
        self.Linear, self.kernel_size = config.linear, config.kernel_size
        self.stride, self.padding = config.stride, config.padding
        expected = words_for(int(np.prod(config.weight_shape)))
        if weight_bits.numel() != expected:
            raise ValueError(f"weight_bits holds {weight_bits.numel()} words, {config.weight_shape} needs {expected}")
        self.register_buffer("weight_bits", weight_bits.reshape(-1).to(torch.int64).contiguous())
        self.output_padding = output_padding
        self.bit_input = bit_input
        if (output_limit is None) != (output_padding is None):
            raise ValueError("a bit output needs both output_limit and output_padding")
        if output_limit is not None:
            if config.kind != XNOR or config.groups != 1:
                raise ValueError(f"only ungrouped XNOR blocks emit bits, not a {config.kind} block "
                                 f"with {config.groups} groups")
            if output_limit.numel() != config.output_channels:
                raise ValueError(f"output_limit has {output_limit.numel()} values, expected {config.output_channels}")
            self.register_buffer("output_limit", output_limit.reshape(-1).contiguous())
        else:
            for name, value in (("alpha", alpha), ("bias", bias)):
                if value is None or value.numel() != config.output_channels:
                    raise ValueError(f"{name} needs {config.output_channels} values")
            self.register_buffer("alpha", alpha.reshape(-1).float().contiguous())
            self.register_buffer("bias", bias.reshape(-1).float().contiguous())
        if config.kind == XNOR:
            if bit_input:
                if threshold is not None or config.groups != 1 or config.previous_conv:
                    raise ValueError("a block fed bits has no threshold, no groups and no previous_conv")
            else:
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
            self._merge_rows = not config.linear and merges_kernel_rows(
                config.kernel_size, config.stride, config.input_channels // config.groups)
            self._kernel_weight, self._tap_ones = runtime_weight(signs, config.groups, self._merge_rows)
            self._offsets: Dict[tuple, np.ndarray] = {}
            self._plans: Dict[tuple, CallPlan] = {}
            zero = np.zeros(config.bn_channels, np.float32)
            channel_thresholds = self.threshold.numpy() if hasattr(self, "threshold") else zero
            self._feature_thresholds = (
                np.repeat(channel_thresholds, config.size) if config.linear and config.previous_conv
                else channel_thresholds
            )
            # The kernels' numpy arguments, made once (per-call conversions cost as much as a small kernel).
            no_limit, self._no_bits = kernels.no_bit_output()
            self._limit = self.output_limit.numpy().astype(np.int32) if output_limit is not None else no_limit
            self._no_floats, self._no_scale = np.empty(0, np.float32), kernels.empty_scale()
            self._no_input = np.empty((0, 0, 0, 0), np.float32)
            self._alpha = self.alpha.numpy() if hasattr(self, "alpha") else self._no_floats
            self._bias = self.bias.numpy() if hasattr(self, "bias") else self._no_floats
        self.eval()

    def state(self) -> Dict[str, object]:
        """The constructor arguments of this block (to rebuild it with some of them changed)."""
        return {"config": self.config, "weight_bits": self.weight_bits, "alpha": getattr(self, "alpha", None),
                "bias": getattr(self, "bias", None), "threshold": getattr(self, "threshold", None),
                "bn": getattr(self, "bn", None), "output_limit": getattr(self, "output_limit", None),
                "output_padding": self.output_padding, "bit_input": self.bit_input}

    @classmethod
    def from_block(cls, block: BinConv2d) -> "PackedBinConv2d":
        """Pack a trained block: BinOp's weight transform, exact sign thresholds, bias."""
        config = BlockConfig.from_block(block)
        layer = block.weight_layer
        signs, alpha = weight_signs_and_alpha(layer.weight)
        bias = layer.bias.detach().float() if layer.bias is not None else torch.zeros(config.output_channels)
        bn = block_batchnorm(block)
        threshold = None
        if config.kind == XNOR:
            # A negative BatchNorm scale (networks without a scale floor) flips a channel's
            # comparison; the weights reading that channel are inverted to match.
            decreasing = decreasing_channels(bn)
            threshold = torch.from_numpy(sign_thresholds(bn, decreasing=decreasing))
            signs = flip_input_signs(signs, _feature_mask(config, decreasing), config.groups)
        return cls(config, torch.from_numpy(pack_dense(signs).view(np.int64)), torch.from_numpy(alpha),
                   bias.clone(), threshold=threshold, bn=None if config.kind == XNOR else bn)

    def extra_repr(self) -> str:
        c = self.config
        ends = ("bits in, " if self.bit_input else "") + ("bits out, " if self.output_padding is not None else "")
        if c.linear:
            return f"{c.kind}, {ends}linear {c.input_channels} -> {c.output_channels}"
        return (f"{c.kind}, {ends}{c.input_channels} -> {c.output_channels}, kernel {c.kernel_size}, "
                f"stride {c.stride}, padding {c.padding}, groups {c.groups}")

    def forward(self, x: Union[torch.Tensor, PackedActivations]) -> Union[torch.Tensor, PackedActivations]:
        if self.training:
            raise RuntimeError("PackedBinConv2d is inference-only: call model.eval()")
        if isinstance(x, PackedActivations) != self.bit_input:
            raise TypeError(f"this block takes {'sign bits from the previous block' if self.bit_input else 'a tensor'}"
                            f", not {type(x).__name__}")
        if torch.is_grad_enabled():  # entering no_grad costs ~2 µs, a tenth of a small block at batch 1
            with torch.no_grad():
                return self.forward(x)
        if self.config.kind == BWN:
            return self._forward_float(x)
        scale = None
        if self.config.kind == XNOR_K:
            x = self.bn(x)  # K needs the float BatchNorm output; its sign is then taken at 0
            # One implementation of eq. (12): the block's own method, on this module's attributes.
            scale = BinConv2d.scale_map(self, x)  # type: ignore[arg-type]
        threads = torch.get_num_threads()  # the kernels follow PyTorch's thread count
        if isinstance(x, PackedActivations):
            return self._xnor("bits", self._check_bits(x), scale, x.shape[0], threads)
        layout, floats = self._float_input(x)
        return self._xnor(layout, floats, scale, x.shape[0], threads)

    def _check_bits(self, x: PackedActivations) -> np.ndarray:
        c = self.config
        words = words_for(c.input_channels)
        if x.channels != c.input_channels or x.padding != c.padding or x.words.shape[3:] != (1, words):
            raise ValueError(f"bits of {x.channels} channels with padding {x.padding} do not fit a block "
                             f"taking {c.input_channels} channels with padding {c.padding}")
        if c.linear:  # a linear block is a 1x1 convolution over a 1 x N image of feature vectors
            return x.words.reshape(1, 1, -1, 1, words)
        return x.words

    def _float_input(self, x: torch.Tensor) -> Tuple[str, np.ndarray]:
        """``("nhwc", [N, H, W, C])`` or ``("nchw", [N, C, H, W])``: a C-contiguous float32 numpy
        view (or copy) of ``x``. A linear block is a 1x1 convolution over a ``1 x N`` image of
        feature vectors."""
        c = self.config
        if x.dtype != torch.float32:
            x = x.float()
        if x.requires_grad:  # detach() costs a tensor; inference inputs rarely need it
            x = x.detach()
        if c.linear:
            rows = x.reshape(x.shape[0], c.input_channels).contiguous().numpy()
            return "nhwc", rows.reshape(1, 1, rows.shape[0], c.input_channels)
        if x.dim() != 4 or x.shape[1] != c.input_channels:
            raise ValueError(f"expected an input [N, {c.input_channels}, H, W], got {list(x.shape)}")
        nhwc = x.numpy().transpose(0, 2, 3, 1)  # numpy views: a few µs cheaper than torch's here
        if nhwc.flags.c_contiguous:  # channels-last memory, as packed blocks return
            return "nhwc", nhwc
        return "nchw", x.contiguous().numpy()

    def _xnor(self, layout: str, source: np.ndarray, scale: Optional[torch.Tensor], n_batch: int,
              threads: int) -> Union[torch.Tensor, PackedActivations]:
        """``relu(alpha * dot * K + bias)`` as a channels-last NCHW tensor (or [N, O]), or, for a
        bit-emitting block, the next block's sign bits; ``source`` is the packed input
        (``layout`` "bits") or floats (:meth:`_float_input`). One kernel call does it all."""
        key = (layout, source.shape, threads, threading.get_ident())  # scratch buffers are per Python thread
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= MAX_PLANS:  # bounded: threads and shapes come and go
                self._plans.clear()
            plan = self._plans[key] = CallPlan.make(self, layout, source.shape, threads)
        packed, merged = source if layout == "bits" else plan.packed, plan.merged
        bits = np.zeros(plan.bits_shape, np.int64) if plan.bits_shape else self._no_bits
        out = plan.no_output if plan.bits_shape else np.empty(plan.out_shape, np.float32)
        scale_array = self._no_scale if scale is None else np.ascontiguousarray(
            scale.float().numpy()).reshape(plan.out_shape[:3])
        kernels.xnor_block(source if layout == "nhwc" else self._no_input,
                           source if layout == "nchw" else self._no_input, packed, merged, scale_array, out, bits,
                           *plan.constants, parallel=plan.parallel, threads=threads)
        c = self.config
        if plan.bits_shape:
            if c.linear:  # back from the 1 x N image to one feature vector per sample
                bits = bits.reshape(n_batch, 1, 1, 1, -1)
            return PackedActivations(bits, self.output_padding, c.output_channels)
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


def _feature_mask(config: BlockConfig, channel_mask: np.ndarray) -> np.ndarray:
    """A per-BatchNorm-channel mask as one value per input feature of the weight: repeated
    over the ``size`` positions of each channel for a linear block that flattens a map."""
    if config.linear and config.previous_conv:
        return np.repeat(channel_mask, config.size)
    return channel_mask


class PackedMaxPool2d(nn.MaxPool2d):
    """A max pool between two packed blocks: the OR of each window's sign bits.

    The max of bits is the bit of the max (the sign is non-decreasing), so this
    is exact; a tensor input is pooled as by ``nn.MaxPool2d``.
    """

    def __init__(self, pool: nn.MaxPool2d, output_padding: int) -> None:
        super().__init__(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices,
                         pool.ceil_mode)
        self.output_padding = output_padding

    def forward(self, x: Union[torch.Tensor, PackedActivations]) -> Union[torch.Tensor, PackedActivations]:
        if not isinstance(x, PackedActivations):
            return super().forward(x)
        n_batch, channels, height, width = x.shape
        kernel, stride, padding = int(self.kernel_size), int(self.stride), int(self.padding)
        out_h = (height + 2 * padding - kernel) // stride + 1
        out_w = (width + 2 * padding - kernel) // stride + 1
        source = x.words[:, x.padding:x.padding + height, x.padding:x.padding + width]
        ring = self.output_padding
        out = np.zeros((n_batch, out_h + 2 * ring, out_w + 2 * ring) + x.words.shape[3:], np.int64)
        kernels.maxpool_bits(np.ascontiguousarray(source), kernel, stride, padding, out, ring,
                             work=out.size * kernel, threads=torch.get_num_threads())
        return PackedActivations(out, ring, channels)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits, output_padding={self.output_padding}"


@dataclass
class FusionPlan:
    """Where a packed model stays in the bit domain (stored in the ``.xnor`` metadata).

    - ``folded``: block -> the per-channel non-decreasing modules right before it
      (BatchNorm with a scale >= 0, ReLU; forward order), replaced by
      ``nn.Identity``: the block's input thresholds include them.
    - ``bit_outputs``: XNOR block -> [the XNOR block it feeds sign bits to, the
      padding ring of its bit output]; ``bit_pools``: max pool between two such
      blocks -> the padding ring of its output.
    - ``float_folds``: a float BatchNorm -> the float 1x1 convolution (no padding)
      or linear layer right after it (dropouts aside), whose weight and bias absorb
      it. This is exact algebra but not bit for bit: it changes float rounding.
    """

    folded: Dict[str, List[str]]
    bit_outputs: Dict[str, List]
    bit_pools: Dict[str, int]
    float_folds: Dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


def _simple_max_pool(module: nn.Module) -> bool:
    """A MaxPool2d with int kernel, stride and padding, no dilation, no ceil mode, no indices."""
    return (type(module) is nn.MaxPool2d and not module.ceil_mode and not module.return_indices
            and all(isinstance(v, int) for v in (module.kernel_size, module.stride, module.padding))
            and module.dilation == 1)


def _non_decreasing(module: nn.Module) -> bool:
    """A per-channel module whose output never decreases as its input grows (in float too)."""
    if isinstance(module, nn.ReLU):
        return True
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return module.weight is None or bool((module.weight.detach() >= 0).all())
    return False


def _xnor_block(module: Optional[nn.Module]) -> bool:
    return isinstance(module, PackedBinConv2d) and module.config.kind == XNOR


def plan_fusion(model: nn.Module) -> FusionPlan:
    """The fusions of a packed model, found inside each ``nn.Sequential`` (whose order is its forward order).

    A chain XNOR block -> [max pools, dropouts] -> XNOR block passes bits when both
    are ungrouped, of the same kind (conv or linear) and the second does not
    flatten a feature map (previous_conv). An XNOR block fed a tensor folds the
    non-decreasing modules in front of it (skipping max pools and dropouts, which
    commute with them).
    """
    plan = FusionPlan({}, {}, {})
    for prefix, sequence in model.named_modules():
        if not isinstance(sequence, nn.Sequential):
            continue
        children = [module for _, module in sequence.named_children()]
        names = [f"{prefix}.{name}" if prefix else name for name, _ in sequence.named_children()]
        for index, module in enumerate(children):
            if not _xnor_block(module):
                continue
            before = index - 1
            while before >= 0 and isinstance(children[before], (nn.MaxPool2d, nn.Dropout)):
                before -= 1
            pools = [i for i in range(before + 1, index) if isinstance(children[i], nn.MaxPool2d)]
            producer = children[before] if before >= 0 else None
            if _xnor_block(producer):
                p, c = producer.config, module.config
                if (p.groups == 1 and c.groups == 1 and p.output_channels == c.input_channels
                        and not c.previous_conv and p.linear == c.linear and not (c.linear and pools)
                        and all(_simple_max_pool(children[i]) for i in pools)):
                    rings = [0] * len(pools) + [c.padding]  # the producer's output, then each pool's
                    plan.bit_outputs[names[before]] = [names[index], rings[0]]
                    plan.bit_pools.update({names[i]: ring for i, ring in zip(pools, rings[1:])})
                    continue
            folded: List[str] = []
            before = index - 1
            while before >= 0 and (_non_decreasing(children[before])
                                   or isinstance(children[before], (nn.Dropout, nn.MaxPool2d))):
                if _non_decreasing(children[before]):
                    folded.insert(0, names[before])
                before -= 1
            if folded:
                plan.folded[names[index]] = folded
        for index, module in enumerate(children):
            after = index + 1
            while after < len(children) and isinstance(children[after], nn.Dropout):
                after += 1
            if (isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and after < len(children)
                    and _absorbs_batchnorm(children[after], module)):
                plan.float_folds[names[index]] = names[after]
    return plan


def _absorbs_batchnorm(layer: nn.Module, bn: nn.Module) -> bool:
    """A float layer that can take a BatchNorm before it into its weight and bias."""
    if type(layer) is nn.Linear:
        return layer.bias is not None and isinstance(bn, nn.BatchNorm1d) and layer.in_features == bn.num_features
    return (type(layer) is nn.Conv2d and layer.bias is not None and isinstance(bn, nn.BatchNorm2d)
            and layer.kernel_size == (1, 1) and layer.padding == (0, 0) and layer.groups == 1
            and layer.in_channels == bn.num_features)


@torch.no_grad()
def fold_batchnorm(bn: nn.Module, layer: nn.Module) -> None:
    """``layer(bn(x)) == layer'(x)``: scale the weight's input channels and shift the bias (float64 math)."""
    scale = (bn.running_var.double() + bn.eps).rsqrt()
    shift = -bn.running_mean.double() * scale
    if bn.weight is not None:
        scale, shift = scale * bn.weight.double(), shift * bn.weight.double() + bn.bias.double()
    weight = layer.weight.double().reshape(layer.weight.shape[0], -1)
    layer.bias.copy_(layer.bias.double() + weight @ shift)
    layer.weight.copy_((weight * scale).reshape(layer.weight.shape))


def _rebuild(model: nn.Module, name: str, **changes: object) -> None:
    """Replace the packed block ``name`` by one with some constructor arguments changed."""
    state = model.get_submodule(name).state()
    state.update(changes)
    replace_module(model, name, PackedBinConv2d(**state))


def apply_fusion(model: nn.Module, plan: FusionPlan, source: Optional[nn.Module] = None) -> None:
    """Rebuild the modules of ``plan`` in place.

    With ``source``, the float model that ``model`` was packed from, the folded
    thresholds and integer limits are computed from its parameters (packing);
    without it (loading a file) the blocks already hold them and only the
    structure changes.
    """
    limits: Dict[str, torch.Tensor] = {}  # computed while every consumer still has its thresholds
    if source is not None:
        for block_name, chain in plan.folded.items():
            block = model.get_submodule(block_name)
            own_bn = block_batchnorm(source.get_submodule(block_name))
            monotone = nn.Sequential(*[copy.deepcopy(source.get_submodule(name)).eval() for name in chain], own_bn)
            # The folded modules are non-decreasing: the chain decreases where the block's BatchNorm
            # does, the channels whose weights from_block inverted.
            threshold = sign_thresholds(monotone, block.config.bn_channels, spatial=not block.config.linear,
                                        decreasing=decreasing_channels(own_bn))
            _rebuild(model, block_name, threshold=torch.from_numpy(threshold))
        for producer_name, (consumer_name, _) in plan.bit_outputs.items():
            producer, consumer = model.get_submodule(producer_name), model.get_submodule(consumer_name)
            c = producer.config
            values = integer_limits(producer.alpha.numpy(), producer.bias.numpy(), consumer.threshold.numpy(),
                                    (c.input_channels // c.groups) * c.kernel_size * c.kernel_size)
            dtype = np.int16 if np.abs(values).max() < 2 ** 15 else np.int32
            limits[producer_name] = torch.from_numpy(values.astype(dtype))
    for producer_name, (_, ring) in plan.bit_outputs.items():
        # Loading: the block was built from the file with its limits already.
        limit = limits[producer_name] if source is not None else model.get_submodule(producer_name).output_limit
        _rebuild(model, producer_name, alpha=None, bias=None, output_padding=int(ring), output_limit=limit)
    for consumer_name, _ in plan.bit_outputs.values():
        _rebuild(model, consumer_name, threshold=None, bit_input=True)
    for pool_name, ring in plan.bit_pools.items():
        replace_module(model, pool_name, PackedMaxPool2d(model.get_submodule(pool_name), int(ring)))
    for chain in plan.folded.values():
        for name in chain:
            replace_module(model, name, nn.Identity())
    for bn_name, layer_name in plan.float_folds.items():
        if source is not None:
            fold_batchnorm(model.get_submodule(bn_name), model.get_submodule(layer_name))
        replace_module(model, bn_name, nn.Identity())


def pack_model(model: nn.Module, fuse: bool = True) -> nn.Module:
    """An eval-mode copy of ``model`` with every BinConv2d replaced by a :class:`PackedBinConv2d`.

    The weights are binarized as they are stored, as BinOp's next ``binarization()``
    would do. Pack before running the simulated model: ``BinOp.restore()`` leaves the
    centred-and-clamped weights behind, and centring them again is not bit-exact.
    ``fuse``: keep activations in the bit domain between blocks and fold layers
    into thresholds where that is exact (:func:`plan_fusion`; the same output bit
    for bit), and fold a float BatchNorm into the float layer after it (the same
    output up to float rounding).
    """
    source = copy.deepcopy(model).eval()
    packed = copy.deepcopy(model).eval()
    for name, module in list(packed.named_modules()):
        if isinstance(module, BinConv2d):
            replace_module(packed, name, PackedBinConv2d.from_block(module))
    packed.fusion_plan = plan_fusion(packed) if fuse else FusionPlan({}, {}, {}, {})
    apply_fusion(packed, packed.fusion_plan, source)
    return packed.eval()


def pack_for_evaluation(model: nn.Module, device: torch.device) -> nn.Module:
    """``--evaluate --packed``: the packed copy of a loaded model; the engine runs on the CPU only."""
    if device.type != "cpu":
        raise UserError(f"--packed runs on the CPU, not {device.type}: add --cpu")
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
