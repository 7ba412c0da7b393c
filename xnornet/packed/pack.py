"""From a trained BinConv2d block to packed bits, alpha and sign thresholds.

The weight transform is exactly :meth:`xnornet.binop.BinOp.binarization`:
``Wc = center_and_clamp(W)`` (eq. 8), ``alpha = filter_alpha(Wc)`` (eq. 1) and the
signs ``binary_sign(Wc)`` (eq. 2), +1 stored as bit 1.

File layout of the bits (``dense``): the signs of the weight tensor in PyTorch's
order ``[O, C_in/groups, KH, KW]`` (``[O, F]`` for a linear block), flattened and
packed into little-endian 64-bit words, bit ``i`` of the stream being bit ``i % 64``
of word ``i // 64``; the last word is padded with 0 bits. Each row (one output
filter) is contiguous along the reduction dimension. The runtime layout used by the
kernels (:mod:`xnornet.packed.kernels`) is rebuilt from it at load time. In an XNOR
block, the signs that read an input channel whose BatchNorm scale is negative are
stored inverted, to go with that channel's inverted comparison (:func:`flip_input_signs`).
"""

from __future__ import annotations

import copy
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..binarize import binary_sign
from ..binop import center_and_clamp, filter_alpha
from ..layers import ConvBlock
from .kernels import WORD_BITS


def words_for(bits: int) -> int:
    """64-bit words needed to hold ``bits`` bits."""
    return -(-bits // WORD_BITS)


def weight_signs_and_alpha(weight: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
    """The binarized weight of BinOp as (signs: bool array, True = +1, shaped like ``weight``; alpha [O] float32)."""
    with torch.no_grad():
        real = center_and_clamp(weight.detach().float())
        alpha = filter_alpha(real).reshape(-1)
        signs = binary_sign(real) > 0
    return signs.cpu().numpy(), alpha.cpu().numpy().astype(np.float32)


def pack_dense(signs: np.ndarray) -> np.ndarray:
    """All of ``signs`` (any shape, C order) as one little-endian bit stream in uint64 words."""
    flat = np.ascontiguousarray(signs, dtype=bool).reshape(-1)
    padded = np.zeros(words_for(flat.size) * WORD_BITS, dtype=bool)
    padded[: flat.size] = flat
    return np.packbits(padded, bitorder="little").view("<u8").copy()


def unpack_dense(words: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pack_dense`: bool signs of ``shape``."""
    count = int(np.prod(shape))
    if words.size != words_for(count):
        raise ValueError(f"{words.size} words cannot hold a {tuple(shape)} bit tensor ({words_for(count)} needed)")
    bits = np.unpackbits(np.ascontiguousarray(words, dtype="<u8").view(np.uint8), bitorder="little")
    return bits[:count].astype(bool).reshape(shape)


def output_blocks(per_group_out: int) -> Tuple[int, int]:
    """(blocks, block width): output channels cut into blocks of at most 256.

    Widths are a multiple of 8 (vectorized loops), and of 64 when there are
    several blocks, so that each block of a bit-emitting kernel owns whole words.
    """
    blocks = -(-per_group_out // 256)
    width = -(-per_group_out // blocks)
    return blocks, -(-width // (8 if blocks == 1 else WORD_BITS)) * (8 if blocks == 1 else WORD_BITS)


def merges_kernel_rows(kernel_size: int, stride: int, group_channels: int) -> bool:
    """Whether a convolution packs each kernel row densely (:func:`runtime_weight`).

    Per tap, the ``C_g`` channels take ``ceil(C_g / 64)`` words, so 96 channels fill
    two words with 32 unused bits; a kernel row of ``KW`` taps packed as one bit
    stream takes ``ceil(KW C_g / 64)`` words (5 taps of 96 channels: 8 words, not 10).
    Only for stride 1, where the input window of output column ``x`` starts at column
    ``x`` (:func:`~xnornet.packed.kernels.merge_kernel_rows` builds those windows).
    """
    return stride == 1 and kernel_size > 1 and (
        words_for(kernel_size * group_channels) < kernel_size * words_for(group_channels))


def runtime_weight(signs: np.ndarray, groups: int, merge_rows: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Kernel layout of conv signs ``[O, C_g, KH, KW]`` (linear: ``[O, F]``).

    Returns ``weight [G, OB, R, BO]`` int64 (:mod:`~xnornet.packed.kernels`; ``R = KH*KW*CW``
    rounded up to a multiple of 4) and ``tap_ones [G, KH*KW, O_g]``, the number of
    +1 weights of each filter at each tap. With ``merge_rows``, each kernel row is
    one bit stream, bit ``kx * C_g + c`` being tap ``kx``, channel ``c``:
    ``R = KH * ceil(KW*C_g / 64)``, rounded up likewise (:func:`merges_kernel_rows`).
    """
    if signs.ndim == 2:
        signs = signs[:, :, None, None]
    out_channels, per_group_in, kernel_h, kernel_w = signs.shape
    per_group_out = out_channels // groups
    blocks, width = output_blocks(per_group_out)
    grouped = signs.reshape(groups, per_group_out, per_group_in, kernel_h, kernel_w)
    tap_ones = grouped.sum(axis=2).reshape(groups, per_group_out, kernel_h * kernel_w).transpose(0, 2, 1)
    taps = grouped.transpose(0, 1, 3, 4, 2)  # [G, O_g, KH, KW, C_g]
    # A "unit" is what the kernel gathers as whole words: one tap, or one merged kernel row.
    units = taps.reshape(groups, per_group_out, kernel_h, kernel_w * per_group_in) if merge_rows else (
        taps.reshape(groups, per_group_out, kernel_h * kernel_w, per_group_in))
    unit_words = words_for(units.shape[3])
    bits = np.zeros((groups, blocks * width, units.shape[2], unit_words * WORD_BITS), dtype=bool)
    bits[:, :per_group_out, :, :units.shape[3]] = units
    packed = np.packbits(bits, axis=-1, bitorder="little").view("<u8")  # [G, OB*BO, units, unit words]
    reduction = units.shape[2] * unit_words
    packed = packed.reshape(groups, blocks, width, reduction).transpose(0, 1, 3, 2)
    weight = np.zeros((groups, blocks, -(-reduction // 4) * 4, width), np.uint64)  # zero rows add nothing
    weight[:, :, :reduction] = packed
    return weight.view(np.int64), np.ascontiguousarray(tap_ones)


def padding_offsets(tap_ones: np.ndarray, group_channels: int, height: int, width: int,
                    kernel_size: int, stride: int, padding: int) -> np.ndarray:
    """``offset [Ho, Wo, O]`` int32 of eq. (14): ``n_valid + 2 * (+1 weights at the padded taps)``.

    Without padding every position has ``n_valid = C_g * KH * KW`` and no padded
    tap: the table is then ``[1, 1, O]``.
    """
    groups, taps, per_group_out = tap_ones.shape
    if padding == 0:
        full = np.full((1, 1, groups * per_group_out), group_channels * taps, np.int64)
        return full.astype(np.int32)
    out_h = (height + 2 * padding - kernel_size) // stride + 1
    out_w = (width + 2 * padding - kernel_size) // stride + 1
    rows = np.arange(out_h)[:, None] * stride - padding + np.arange(kernel_size)[None, :]
    cols = np.arange(out_w)[:, None] * stride - padding + np.arange(kernel_size)[None, :]
    inside = ((rows >= 0) & (rows < height))[:, None, :, None] & ((cols >= 0) & (cols < width))[None, :, None, :]
    inside = inside.reshape(out_h, out_w, taps)
    n_valid = inside.sum(axis=2) * group_channels
    padded_ones = np.einsum("yxt,gto->yxgo", (~inside).astype(np.int64), tap_ones.astype(np.int64))
    offset = n_valid[:, :, None, None] + 2 * padded_ones
    return offset.reshape(out_h, out_w, groups * per_group_out).astype(np.int32)


def _ordered_keys(values: np.ndarray) -> np.ndarray:
    """float32 -> int64 keys with the same order (-0.0 and +0.0 share key 0)."""
    bits = values.astype(np.float32).view(np.int32).astype(np.int64)
    return np.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


def _from_keys(keys: np.ndarray) -> np.ndarray:
    bits = np.where(keys >= 0, keys, (-keys) | 0x80000000).astype(np.uint32)
    return bits.view(np.float32)


def _positive_after(fn: nn.Module, values: np.ndarray, spatial: bool, layout: str = "small") -> np.ndarray:
    """Per channel ``c``: ``fn(values[c]) >= 0``, the value repeated over an input of ``layout``.

    ``spatial``: ``fn`` takes ``[N, C, H, W]`` (else ``[N, C]``). ``layout``: "small"
    (one element per channel), "batch" (several samples and positions) or
    "channels_last" (the same in channels-last memory). Raises when equal inputs
    of one channel give different signs.
    """
    channels = values.shape[0]
    column = torch.from_numpy(values.astype(np.float32))
    if spatial:
        shape = (1, channels, 1, 1) if layout == "small" else (3, channels, 4, 5)
        source = column.reshape(1, channels, 1, 1).expand(shape)
        memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        source = source.contiguous(memory_format=memory_format)
    else:
        source = column.reshape(1, channels).expand(1 if layout == "small" else 5, channels).contiguous()
    with torch.no_grad():
        positive = (fn(source) >= 0).transpose(0, 1).reshape(channels, -1)
    if not bool((positive.all(dim=1) | ~positive.any(dim=1)).all()):
        raise RuntimeError("BatchNorm gave different results for equal inputs: no exact sign threshold exists")
    return positive[:, 0].numpy()


def block_batchnorm(block: ConvBlock) -> nn.Module:
    """An eval-mode copy of a block's BatchNorm as its forward pass applies it: with the scale
    clamped to the block's ``bn_scale_floor`` where it has one (LeNet-5, NIN), as it is otherwise."""
    bn = copy.deepcopy(block.bn).eval()
    if block.bn_scale_floor is not None:
        with torch.no_grad():
            bn.weight.clamp_(min=block.bn_scale_floor)
    return bn


def decreasing_channels(bn: nn.Module) -> np.ndarray:
    """Per channel, whether the BatchNorm's output decreases as its input grows (a negative scale)."""
    if getattr(bn, "weight", None) is None:
        return np.zeros(bn.num_features, dtype=bool)
    return (bn.weight.detach().cpu() < 0).numpy()


def flip_input_signs(signs: np.ndarray, flipped: np.ndarray, groups: int) -> np.ndarray:
    """``signs`` (``[O, C_in/groups, KH, KW]`` or linear ``[O, F]``) with the weights that read a
    ``flipped`` input channel (bool ``[C_in]`` or ``[F]``) inverted.

    For a channel whose BatchNorm has a negative scale the packed input bit is the inverted sign,
    ``x >= t`` meaning ``sign(bn(x)) = -1`` (:func:`sign_thresholds`); inverting the weights that
    read it keeps every product, and so the dot product and the padding correction, unchanged.
    """
    flipped = np.asarray(flipped, dtype=bool)
    out_channels, per_group_in = signs.shape[:2]
    if flipped.size != groups * per_group_in:
        raise ValueError(f"{flipped.size} input channels to flip, but the weight reads {groups * per_group_in}")
    if not flipped.any():
        return signs
    per_filter = np.repeat(flipped.reshape(groups, per_group_in), out_channels // groups, axis=0)  # [O, C_g]
    return signs ^ per_filter.reshape(per_filter.shape + (1,) * (signs.ndim - 2))


def sign_thresholds(bn: nn.Module, channels: Optional[int] = None, spatial: Optional[bool] = None,
                    decreasing: Optional[np.ndarray] = None) -> np.ndarray:
    """Per channel, the smallest float32 ``t`` with ``bn(t) >= 0`` (``bn`` evaluated by PyTorch itself).

    ``bn`` is the BatchNorm as the block applies it (:func:`block_batchnorm`). With a
    non-negative scale the float BatchNorm is non-decreasing in its input, so for every
    float32 ``x`` ``binary_sign(bn(x)) == +1`` exactly when ``x >= t``. For the channels
    marked ``decreasing`` (a negative scale, :func:`decreasing_channels`; only networks
    without a scale floor have them) the comparison flips: ``t`` is then the smallest
    float32 with ``bn(t) < 0``, and ``x >= t`` means ``binary_sign(bn(x)) == -1``; the
    block inverts the weights of those channels to match (:func:`flip_input_signs`).
    The threshold is found by bisection over the float32 values in order, and checked
    in three tensor layouts, so the comparison reproduces the float simulation bit for
    bit (a threshold derived by algebra, ``mean - beta * std / gamma``, can be off by
    one rounding step). ``+inf`` marks a channel that no finite input turns on. (A zero
    scale makes a channel constant for finite inputs and NaN at +-inf, where no threshold
    can follow it: such a channel is exact for finite inputs only.)

    ``bn`` may be any per-channel monotone module (e.g. a Sequential of BatchNorm with a
    non-negative scale, ReLU and a block's BatchNorm), non-decreasing except in the
    ``decreasing`` channels; then give its ``channels`` and whether it takes
    ``[N, C, H, W]`` (``spatial``).
    """
    channels = bn.num_features if channels is None else channels
    spatial = isinstance(bn, nn.BatchNorm2d) if spatial is None else spatial
    flip = np.zeros(channels, dtype=bool) if decreasing is None else np.asarray(decreasing, dtype=bool)
    if flip.shape != (channels,):
        raise ValueError(f"decreasing has shape {flip.shape}, expected ({channels},)")

    def on(values: np.ndarray, layout: str = "small") -> np.ndarray:
        """Whether the packed bit is 1: ``bn >= 0``, or ``bn < 0`` in the decreasing channels."""
        return _positive_after(bn, values, spatial, layout) ^ flip

    biggest = np.finfo(np.float32).max
    infinity = _ordered_keys(np.array([-np.inf, np.inf], np.float32))
    # Searched over the finite floats: at +-inf a BatchNorm of zero scale gives NaN, which would
    # otherwise decide the threshold of a channel that is constant for every finite input.
    low = np.full(channels, _ordered_keys(np.array([-biggest], np.float32))[0])
    high = np.full(channels, infinity[1])
    # Invariant: the bit is 0 at value(low) (unless low_on), and 1 at value(high) or high is +inf.
    low_on = on(_from_keys(low))
    if (low_on & ~on(np.full(channels, biggest, np.float32))).any():
        raise RuntimeError("BatchNorm threshold search: a channel is on at -max but not at +max "
                           "(a negative scale not marked as decreasing?)")
    while True:
        open_interval = (high - low > 1) & ~low_on
        if not open_interval.any():
            break
        middle = np.where(open_interval, low + (high - low) // 2, high)
        is_on = on(_from_keys(middle))
        high = np.where(open_interval & is_on, middle, high)
        low = np.where(open_interval & ~is_on, middle, low)
    keys = np.where(low_on, infinity[0], high)  # on everywhere: -inf
    thresholds = _from_keys(keys)
    below = _from_keys(keys - 1)
    never = np.isposinf(thresholds)  # no finite input gives 1 (e.g. a zero scale, a negative shift)
    for layout in ("small", "batch", "channels_last"):
        if not (on(thresholds, layout) | never | low_on).all() or (on(below, layout) & ~low_on).any():
            raise RuntimeError(f"BatchNorm threshold search is inconsistent in the {layout!r} layout")
    return thresholds


def integer_limits(alpha: np.ndarray, bias: np.ndarray, threshold: np.ndarray, reduction: int) -> np.ndarray:
    """Fold a block's output and the next block's sign into one integer per channel.

    A block outputs ``relu(alpha * dot + bias)``, computed in float32 exactly as
    the kernel does; the next block's bit is ``output >= threshold`` (its exact
    sign threshold). For ``alpha >= 0`` that is non-decreasing in the integer
    ``dot`` (``|dot| <= reduction``), so the bit is ``dot >= limit``: the smallest
    such ``dot``, found by bisection (``reduction + 1`` when no ``dot`` gives +1).
    A max pool between the blocks keeps this exact: the max of bits is the bit of the max.
    """
    alpha, bias = alpha.astype(np.float32), bias.astype(np.float32)
    threshold = threshold.astype(np.float32)
    if (alpha < 0).any():
        raise ValueError("a negative alpha: the block output is not monotone in dot")

    def positive(dot: np.ndarray) -> np.ndarray:
        value = alpha * dot.astype(np.float32) + bias  # the kernel's float32 expression, factor 1
        return np.maximum(value, np.float32(0.0)) >= threshold

    low = np.full(alpha.shape, -reduction - 1, np.int64)  # bit(low) is 0, or low is below every dot
    high = np.full(alpha.shape, reduction + 1, np.int64)  # bit(high) is 1, or high is above every dot
    while True:
        open_interval = high - low > 1
        if not open_interval.any():
            break
        middle = np.where(open_interval, (low + high) // 2, high)
        is_positive = positive(middle)
        high = np.where(open_interval & is_positive, middle, high)
        low = np.where(open_interval & ~is_positive, middle, low)
    limits = np.maximum(high, -reduction)
    inside = limits <= reduction
    if not (positive(np.where(inside, limits, reduction)) | ~inside).all() or (
            positive(limits - 1) & (limits > -reduction)).any():
        raise RuntimeError("integer threshold search is inconsistent")
    return limits
