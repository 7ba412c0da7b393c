"""The packed engine's pieces: bit layout, exact sign thresholds, XNOR-popcount convolution.

Shapes cover kernel sizes 1-11, strides 1-4, zero padding, groups, batch sizes
1 and > 1, and channel counts that are not multiples of 64.
"""

from __future__ import annotations

import copy
import ctypes.util
import multiprocessing
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from xnornet import BinConv2d, BinOp
from xnornet.layers import BN_SCALE_FLOOR
from xnornet.packed import PackedBinConv2d, kernels
from xnornet.packed.pack import (
    block_batchnorm,
    decreasing_channels,
    flip_input_signs,
    merges_kernel_rows,
    pack_dense,
    padding_offsets,
    runtime_weight,
    sign_thresholds,
    unpack_dense,
    weight_signs_and_alpha,
    words_for,
)

# (in, out, kernel, stride, padding, groups, height, width)
CONV_SHAPES = [
    (3, 8, 3, 1, 1, 1, 5, 6),
    (20, 50, 5, 1, 0, 1, 12, 12),  # LeNet-5
    (192, 160, 1, 1, 0, 1, 4, 4),  # NIN 1x1
    (96, 192, 5, 1, 2, 1, 8, 8),  # NIN 5x5
    (192, 192, 3, 1, 1, 1, 8, 8),  # NIN 3x3
    (70, 130, 3, 2, 1, 1, 9, 11),
    (64, 64, 3, 1, 1, 2, 7, 7),
    (130, 66, 3, 1, 2, 2, 6, 5),
    (3, 10, 11, 4, 2, 1, 23, 23),
    (1, 1, 3, 1, 1, 1, 4, 4),
]


def randomize_batchnorm(module: nn.Module, generator: torch.Generator) -> None:
    """Trained-looking BatchNorm statistics; some raw scales below the clamp floor or negative."""
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
                bn.running_mean.normal_(0.0, 0.5, generator=generator)
                bn.running_var.uniform_(0.2, 3.0, generator=generator)
                if bn.affine:
                    bn.weight.uniform_(-0.3, 2.0, generator=generator)
                    bn.bias.normal_(0.0, 0.5, generator=generator)


def test_dense_bits_follow_the_documented_order() -> None:
    signs = np.zeros((3, 5, 2, 3), dtype=bool)
    signs.reshape(-1)[70] = True
    words = pack_dense(signs)
    assert words.dtype == np.uint64 and words.size == words_for(signs.size) == 2
    assert words[0] == 0 and words[1] == 1 << 6  # bit 70 = bit 6 of word 1
    rng = np.random.default_rng(0)
    for shape in [(1,), (64,), (65,), (7, 5, 3, 3), (500, 800)]:
        signs = rng.random(shape) < 0.5
        np.testing.assert_array_equal(unpack_dense(pack_dense(signs), shape), signs)


@pytest.mark.parametrize("floor", [BN_SCALE_FLOOR, None])
@pytest.mark.parametrize("spatial", [True, False])
def test_sign_thresholds_reproduce_the_sign_of_batchnorm(spatial: bool, floor) -> None:
    """With the 2017 floor (LeNet-5, NIN) every scale is positive; without it (AlexNet) some are
    negative or zero: there the bit ``x >= t`` is the inverted sign (``bn(x) < 0``)."""
    generator = torch.Generator().manual_seed(1)
    channels = 37
    block = BinConv2d(channels, 4, 1, 1, 0, bn_scale_floor=floor) if spatial else BinConv2d(
        channels, 4, Linear=True, bn_scale_floor=floor)
    randomize_batchnorm(block, generator)
    with torch.no_grad():
        block.bn.weight[:5] = torch.tensor([1e-6, -2.0, 0.01, 0.0, 0.0])
        block.bn.bias[3:5] = torch.tensor([0.5, -0.5])  # zero scale: always +1, never +1
    bn = block_batchnorm(block)
    decreasing = decreasing_channels(bn)
    if floor is None:
        assert decreasing[1] and not decreasing[[0, 2, 3, 4]].any()
        assert torch.equal(bn.weight, block.bn.weight)
    else:
        assert not decreasing.any() and bn.weight.min() == floor  # clamped as ConvBlock.forward does
    thresholds = sign_thresholds(bn, decreasing=decreasing)
    # Values at, just below and just above each threshold, and a wide random spread.
    near = np.stack([thresholds, np.nextafter(thresholds, -np.inf), np.nextafter(thresholds, np.inf),
                     np.nextafter(np.nextafter(thresholds, -np.inf), -np.inf)]).astype(np.float32)
    spread = torch.randn(60, channels, generator=generator).numpy() * 3.0
    values = torch.from_numpy(np.concatenate([near, spread]).astype(np.float32))  # [rows, C]
    if spatial:
        values = values.T.reshape(1, channels, -1, 4)
        layouts = [values.contiguous(), values.contiguous(memory_format=torch.channels_last)]
        limit = torch.from_numpy(thresholds).reshape(1, channels, 1, 1)
    else:
        layouts = [values]
        limit = torch.from_numpy(thresholds).reshape(1, channels)
    flip = torch.from_numpy(decreasing).reshape(limit.shape)
    with torch.no_grad():
        for tensor in layouts:
            # (+-inf only next to the zero-scale channels' thresholds, where BatchNorm gives NaN)
            finite = torch.isfinite(tensor)
            assert torch.equal((tensor >= limit)[finite], ((bn(tensor) >= 0) ^ flip)[finite])
    if floor is None:
        assert np.isneginf(thresholds[3]) and np.isposinf(thresholds[4])  # always on, never on
        with pytest.raises(RuntimeError, match="not marked as decreasing"):
            sign_thresholds(bn)


def test_flipped_input_channels_invert_exactly_the_weights_that_read_them() -> None:
    rng = np.random.default_rng(4)
    signs = rng.random((6, 3, 2, 2)) < 0.5  # 2 groups: filters 0-2 read channels 0-2, filters 3-5 channels 3-5
    flipped = np.array([False, True, False, False, False, True])
    out = flip_input_signs(signs, flipped, groups=2)
    np.testing.assert_array_equal(out[:3, 1], ~signs[:3, 1])
    np.testing.assert_array_equal(out[3:, 2], ~signs[3:, 2])
    keep = np.ones((6, 3), dtype=bool)
    keep[:3, 1] = keep[3:, 2] = False
    np.testing.assert_array_equal(out[keep], signs[keep])
    linear = rng.random((4, 5)) < 0.5
    np.testing.assert_array_equal(flip_input_signs(linear, np.arange(5) % 2 == 1, 1)[:, 1::2], ~linear[:, 1::2])
    assert flip_input_signs(linear, np.zeros(5, dtype=bool), 1) is linear
    with pytest.raises(ValueError, match="input channels"):
        flip_input_signs(linear, np.zeros(4, dtype=bool), 1)


def merged_rows(packed: np.ndarray, kernel_size: int, group_channels: int) -> np.ndarray:
    """The kernel's input for merged kernel rows (stride 1), built by the kernel under test."""
    out_w = packed.shape[2] - kernel_size + 1
    merged = np.zeros(packed.shape[:2] + (out_w, packed.shape[3], words_for(kernel_size * group_channels)), np.int64)
    kernels.merge_kernel_rows(packed, kernel_size, group_channels, merged)
    return merged


@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_compare_words_hold_one_bit_per_pair_and_zeros_above(dtype) -> None:
    """``_ge_word``: bit ``i`` is ``a[a_start + i] >= b[b_start + i]`` for every count 0-64 (the
    64-, 32-, 16- and 8-lane compares and the one-at-a-time rest), higher bits 0; ties give 1,
    a NaN gives 0 (as ``>=`` does)."""
    rng = np.random.default_rng(3)
    a = rng.integers(-3, 4, 200).astype(dtype)  # small values: many ties
    b = rng.integers(-3, 4, 150).astype(dtype)
    if dtype == np.float32:
        a[[5, 77]] = np.nan
        b[40] = np.nan
    for count in range(kernels.WORD_BITS + 1):
        for a_start, b_start in ((0, 0), (5, 37), (136 - count, 86 - count)):
            expected = 0
            for i in range(count):
                expected |= int(a[a_start + i] >= b[b_start + i]) << i
            word = kernels._ge_word(a, a_start, b, b_start, count)
            assert np.uint64(np.int64(word)) == np.uint64(expected), (count, a_start, b_start)


def test_merged_kernel_rows_concatenate_the_window_bits() -> None:
    """Bit kx * C_g + c of a merged row is channel c of pixel x + kx; the tail bits are 0."""
    generator = torch.Generator().manual_seed(11)
    batch, channels, groups, k, height, width = 2, 70, 2, 3, 4, 6
    signs = torch.rand(batch, channels, height, width, generator=generator) < 0.5
    packed = np.zeros((batch, height, width, groups, words_for(channels // groups)), np.int64)
    kernels.pack_nchw(torch.where(signs, 1.0, -1.0).numpy(), np.zeros(channels, np.float32), groups, 0, packed,
                      signs.shape[2])
    merged = merged_rows(packed, k, channels // groups)
    stream = np.unpackbits(merged.view(np.uint8), bitorder="little").reshape(merged.shape[:4] + (-1,))
    windows = signs.numpy().reshape(batch, groups, channels // groups, height, width)
    for x in range(width - k + 1):
        expected = windows[..., x:x + k].transpose(0, 3, 1, 4, 2).reshape(batch, height, groups, -1)
        np.testing.assert_array_equal(stream[:, :, x, :, :expected.shape[-1]], expected)
    assert not stream[..., k * channels // groups:].any()


def test_kernel_rows_merge_only_where_it_saves_words() -> None:
    assert merges_kernel_rows(5, 1, 96) and merges_kernel_rows(5, 1, 20) and merges_kernel_rows(3, 1, 65)
    assert not merges_kernel_rows(3, 1, 192)  # 3 whole words per tap: nothing to save
    assert not merges_kernel_rows(1, 1, 96) and not merges_kernel_rows(3, 2, 70)  # 1x1; stride 2
    nin_5x5 = PackedBinConv2d.from_block(BinConv2d(96, 192, kernel_size=5, stride=1, padding=2).eval())
    assert nin_5x5._kernel_weight.shape[2] == 5 * 8  # not 5 * 5 * 2 = 50 (rounded up to 52)


CONV_CASES = [(shape, merge) for shape in CONV_SHAPES for merge in (False, True)
              if not merge or merges_kernel_rows(shape[2], shape[3], shape[0] // shape[5])]


@pytest.mark.parametrize("shape, merge", CONV_CASES)
@pytest.mark.parametrize("batch", [1, 3])
def test_xnor_conv_gives_the_exact_integer_dot_product(shape, merge: bool, batch: int) -> None:
    """alpha = 1: the kernel's output is the +-1 convolution with zero padding, exactly (eq. 13, 14),
    taking one tap or one merged kernel row (``merge``) as its unit of words."""
    cin, cout, k, stride, padding, groups, height, width = shape
    generator = torch.Generator().manual_seed(sum(shape) + batch)
    x_signs = torch.rand(batch, cin, height, width, generator=generator) < 0.5
    w_signs = torch.rand(cout, cin // groups, k, k, generator=generator) < 0.5
    x = torch.where(x_signs, 1.0, -1.0)
    w = torch.where(w_signs, 1.0, -1.0)
    shift = 4096.0  # keeps every output above the fused ReLU; integers stay exact in float32
    expected = F.conv2d(x, w, torch.full((cout,), shift), stride, padding, 1, groups) - shift

    weight, tap_ones = runtime_weight(w_signs.numpy(), groups, merge)
    words = words_for(cin // groups)
    zero = np.zeros(cin, np.float32)
    packed_nchw = np.zeros((batch, height + 2 * padding, width + 2 * padding, groups, words), np.int64)
    packed_nhwc = np.zeros_like(packed_nchw)
    kernels.pack_nchw(x.numpy(), zero, groups, padding, packed_nchw, 2)
    kernels.pack_nhwc(x.permute(0, 2, 3, 1).contiguous().numpy(), zero, groups, padding, packed_nhwc)
    np.testing.assert_array_equal(packed_nchw, packed_nhwc)

    offsets = padding_offsets(tap_ones, cin // groups, height, width, k, stride, padding)
    packed_input, kernel_w = (merged_rows(packed_nchw, k, cin // groups), 1) if merge else (packed_nchw, k)
    out = np.empty((batch, *expected.shape[2:], cout), np.float32)
    kernels.xnor_conv(packed_input, weight, offsets, stride, k, kernel_w, np.ones(cout, np.float32),
                      np.full(cout, shift, np.float32), kernels.empty_scale(), out, *kernels.no_bit_output(), 0, 1, 1)
    assert torch.equal(torch.from_numpy(out).permute(0, 3, 1, 2) - shift, expected)

    if groups == 1:
        # Bit output: the next block's signs dot >= limit, packed with the next block's padding ring.
        limits = torch.randint(-cin * k * k - 1, cin * k * k + 2, (cout,), generator=generator).to(torch.int32)
        ring = 1
        bits = np.zeros((batch, out.shape[1] + 2 * ring, out.shape[2] + 2 * ring, 1, words_for(cout)), np.int64)
        kernels.xnor_conv(packed_input, weight, offsets, stride, k, kernel_w, np.empty(0, np.float32),
                          np.empty(0, np.float32), kernels.empty_scale(), np.empty(out.shape[:3] + (0,), np.float32),
                          limits.numpy(), bits, ring, 2, 2)
        reference = np.zeros_like(bits)
        kernels.pack_nchw((expected >= limits.reshape(1, -1, 1, 1).float()).float().numpy(),
                          np.full(cout, 0.5, np.float32), 1, ring, reference, out.shape[1])
        np.testing.assert_array_equal(bits, reference)


def simulated(block: BinConv2d, x: torch.Tensor) -> torch.Tensor:
    block.eval()
    with torch.no_grad(), BinOp(block).binarized():
        return block(x)


def assert_close_to_simulation(block: BinConv2d, x: torch.Tensor) -> None:
    packed = PackedBinConv2d.from_block(block)
    reference = simulated(block, x)
    with torch.no_grad():
        out = packed(x)
    assert out.shape == reference.shape
    scale = reference.abs().max().clamp_min(1e-12)
    assert (out - reference).abs().max() <= 1e-5 * scale, (out - reference).abs().max()


BLOCK_CASES = [
    (shape, variant)
    for shape in CONV_SHAPES
    for variant in ({}, {"activation_scale": True}, {"binary_activations": False})
    # the simulated K (avg_pool2d) itself needs padding <= kernel / 2
    if not (variant.get("activation_scale") and 2 * shape[4] > shape[2])
]


@pytest.mark.parametrize("floor", [BN_SCALE_FLOOR, None])  # LeNet-5 / NIN blocks, AlexNet blocks
@pytest.mark.parametrize("shape, variant", BLOCK_CASES)
def test_packed_conv_block_matches_the_simulated_block(shape, variant, floor) -> None:
    cin, cout, k, stride, padding, groups, height, width = shape
    generator = torch.Generator().manual_seed(sum(shape))
    block = BinConv2d(cin, cout, k, stride, padding, groups=groups, bn_scale_floor=floor, **variant)
    randomize_batchnorm(block, generator)  # some scales negative: kept without a floor
    for batch in (1, 3):
        assert_close_to_simulation(block, torch.randn(batch, cin, height, width, generator=generator))


@pytest.mark.parametrize("floor", [BN_SCALE_FLOOR, None])
@pytest.mark.parametrize("variant", [{}, {"activation_scale": True}, {"binary_activations": False}])
def test_packed_linear_blocks_match_the_simulated_blocks(variant, floor) -> None:
    generator = torch.Generator().manual_seed(7)
    after_conv = BinConv2d(50 * 16, 500, Linear=True, previous_conv=True, size=16, bn_scale_floor=floor,
                           **variant)  # LeNet-5 ip1
    plain = BinConv2d(130, 70, Linear=True, bn_scale_floor=floor, **variant)  # AlexNet's classifier blocks
    for block, shape in ((after_conv, (50, 4, 4)), (plain, (130,))):
        randomize_batchnorm(block, generator)
        assert bool((block.bn.weight < 0).any())  # the floor (if any) applies inside the forward pass
        for batch in (1, 5):
            assert_close_to_simulation(block, torch.randn(batch, *shape, generator=generator))


def test_negative_batchnorm_scales_invert_the_stored_weights_of_their_channels() -> None:
    """Without a scale floor, an XNOR block packs the inverted sign of each channel whose scale is
    negative and stores that channel's weights inverted (the products are unchanged); K and BWN
    blocks, which keep their BatchNorm in float, store the plain signs."""
    generator = torch.Generator().manual_seed(8)
    for variant in ({}, {"activation_scale": True}):
        block = BinConv2d(6 * 4, 5, Linear=True, previous_conv=True, size=4, **variant)
        randomize_batchnorm(block, generator)
        with torch.no_grad():
            block.bn.weight.copy_(torch.tensor([0.5, -0.5, 1.0, -2.0, 0.3, 0.7]))
        packed = PackedBinConv2d.from_block(block.eval())
        stored = unpack_dense(packed.weight_bits.numpy().view(np.uint64), (5, 24))
        plain, _ = weight_signs_and_alpha(block.linear.weight)
        inverted = np.repeat([False, True, False, True, False, False], 4) if not variant else np.zeros(24, bool)
        np.testing.assert_array_equal(stored, plain ^ inverted[None, :])
        assert_close_to_simulation(block, torch.randn(3, 6, 2, 2, generator=generator))


def test_packed_block_takes_nchw_and_channels_last_inputs_alike() -> None:
    generator = torch.Generator().manual_seed(3)
    block = BinConv2d(96, 64, 3, 1, 1)
    randomize_batchnorm(block, generator)
    packed = PackedBinConv2d.from_block(block.eval())
    x = torch.randn(2, 96, 6, 7, generator=generator)
    with torch.no_grad():
        out = packed(x)
        assert torch.equal(out, packed(x.contiguous(memory_format=torch.channels_last)))
        assert torch.equal(out, packed(x[:, :, :, :].transpose(2, 3).contiguous().transpose(2, 3)))


def test_packed_block_is_inference_only() -> None:
    packed = PackedBinConv2d.from_block(BinConv2d(8, 8, 3, 1, 1).eval())
    packed.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        packed(torch.randn(1, 8, 4, 4))


def test_parallel_builds_give_the_serial_results(two_threads) -> None:
    """Every kernel's prange build (used above the work thresholds, which the small test
    shapes never reach) writes exactly what its serial build writes, with several rows per job."""
    generator = torch.Generator().manual_seed(5)
    cin, cout, k, padding, height, width, batch = 70, 130, 3, 1, 7, 6, 3
    x = torch.randn(batch, cin, height, width, generator=generator)
    thresholds = torch.randn(cin, generator=generator).numpy()
    w_signs = (torch.rand(cout, cin, k, k, generator=generator) < 0.5).numpy()
    weight, tap_ones = runtime_weight(w_signs, 1)
    offsets = padding_offsets(tap_ones, cin, height, width, k, 1, padding)
    alpha = torch.rand(cout, generator=generator).numpy()
    bias = torch.randn(cout, generator=generator).numpy()
    limits = torch.randint(-cin * k * k, cin * k * k, (cout,), generator=generator).to(torch.int32).numpy()
    results = {}
    for build in ("serial", "parallel"):
        packed = np.zeros((batch, height + 2 * padding, width + 2 * padding, 1, words_for(cin)), np.int64)
        getattr(kernels.pack_nchw, build)(x.numpy(), thresholds, 1, padding, packed, 2)  # 7 rows: 2, 2, 2, 1
        packed_nhwc = np.zeros_like(packed)
        getattr(kernels.pack_nhwc, build)(x.permute(0, 2, 3, 1).contiguous().numpy(), thresholds, 1, padding,
                                          packed_nhwc)
        out = np.empty((batch, height, width, cout), np.float32)
        getattr(kernels.xnor_conv, build)(packed, weight, offsets, 1, k, k, alpha, bias, kernels.empty_scale(),
                                          out, *kernels.no_bit_output(), 0, 3, 2)
        bits = np.zeros((batch, height, width, 1, words_for(cout)), np.int64)
        getattr(kernels.xnor_conv, build)(packed, weight, offsets, 1, k, k, np.empty(0, np.float32),
                                          np.empty(0, np.float32), kernels.empty_scale(),
                                          np.empty((batch, height, width, 0), np.float32), limits, bits, 0, 2, 3)
        pooled = np.zeros((batch, 4 + 2, 3 + 2, 1, words_for(cout)), np.int64)
        getattr(kernels.maxpool_bits, build)(bits, 3, 2, 1, pooled, 1)
        merged = np.zeros((batch, height + 2 * padding, width + 2 * padding - k + 1, 1, words_for(k * cin)),
                          np.int64)
        getattr(kernels.merge_kernel_rows, build)(packed, k, cin, merged)
        results[build] = (packed, packed_nhwc, out, bits, pooled, merged)
    for serial, parallel in zip(results["serial"], results["parallel"]):
        np.testing.assert_array_equal(serial, parallel)
    assert np.array_equal(results["serial"][0], results["serial"][1]) and results["serial"][3].any()
    assert results["serial"][5].any()


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_every_convolution_job_runs_whether_claimed_or_in_fixed_shares(workers: int, two_threads) -> None:
    """With enough jobs per worker (``kernels.CLAIMED_FROM``), the last quarter of the convolution's
    jobs is handed out one at a time: every job still runs once (no output left unwritten) and
    the parallel build writes what the serial build writes; likewise below that count (a few
    one-row jobs per worker, all in fixed shares)."""
    generator = torch.Generator().manual_seed(9)
    cin, cout, k, height, width = 70, 130, 3, 4, 5
    w_signs = (torch.rand(cout, cin, k, k, generator=generator) < 0.5).numpy()
    weight, tap_ones = runtime_weight(w_signs, 1)
    offsets = padding_offsets(tap_ones, cin, height, width, k, 1, 1)
    alpha, bias = torch.rand(cout, generator=generator).numpy(), torch.randn(cout, generator=generator).numpy()
    outputs = []
    for batch in (kernels.CLAIMED_FROM * workers // height, 2 * workers // height + 1):
        x = torch.randn(batch, cin, height, width, generator=generator)
        packed = np.zeros((batch, height + 2, width + 2, 1, words_for(cin)), np.int64)
        kernels.pack_nchw(x.numpy(), np.zeros(cin, np.float32), 1, 1, packed, height)
        for build in (kernels.xnor_conv.serial, kernels.xnor_conv.parallel):
            out = np.full((batch, height, width, cout), np.nan, np.float32)
            build(packed, weight, offsets, 1, k, k, alpha, bias, kernels.empty_scale(), out,
                  *kernels.no_bit_output(), 0, 1, workers if build is kernels.xnor_conv.parallel else 1)
            outputs.append(out)
    assert outputs[0].shape[0] * height >= kernels.CLAIMED_FROM * workers  # one job per output row
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_array_equal(outputs[2], outputs[3])
    assert not np.isnan(outputs[1]).any() and not np.isnan(outputs[3]).any()


def test_parallel_kernels_run_on_numbas_openmp_layer_on_linux(two_threads) -> None:
    """On Linux with GNU OpenMP, numba's parallel loops take its OpenMP layer (a loop starts in
    microseconds, not the work queue's ~100 µs); elsewhere the work queue; a user's
    NUMBA_THREADING_LAYER wins."""
    packed = np.zeros((1, 2, 2, 1, 1), np.int64)
    kernels.pack_nchw.parallel(np.ones((1, 3, 2, 2), np.float32), np.zeros(3, np.float32), 1, 0, packed, 1)
    assert (packed == 0b111).all()
    if "NUMBA_THREADING_LAYER" in os.environ:
        expected = os.environ["NUMBA_THREADING_LAYER"]
    else:
        expected = "omp" if sys.platform.startswith("linux") and ctypes.util.find_library("gomp") else "workqueue"
    assert kernels.threading_layer() == expected


def _pack_in_child(result) -> None:
    x = np.ones((1, 3, 2, 2), np.float32)
    packed = np.zeros((1, 2, 2, 1, 1), np.int64)
    kernels.pack_nchw(x, np.zeros(3, np.float32), 1, 0, packed, 1, work=10**9, threads=2)
    result.put(int(packed[0, 0, 0, 0, 0]))


def test_a_forked_child_runs_the_serial_builds(two_threads) -> None:
    """After the parent ran a parallel loop, a forked child's call (large work, two threads)
    takes the serial build: GNU OpenMP would stop the child in the parallel one."""
    kernels.pack_nchw(np.ones((1, 3, 2, 2), np.float32), np.zeros(3, np.float32), 1, 0,
                      np.zeros((1, 2, 2, 1, 1), np.int64), 1, work=10**9, threads=2)
    assert kernels.pack_nchw.runs_parallel(10**9, 2)
    context = multiprocessing.get_context("fork")
    result = context.Queue()
    child = context.Process(target=_pack_in_child, args=(result,))
    child.start()
    child.join(60)
    assert child.exitcode == 0 and result.get(timeout=5) == 0b111


def recorded_block_call(block: PackedBinConv2d, x: torch.Tensor, monkeypatch) -> list:
    """Every kernel call that ``block(x)`` makes, as (kernel, arguments, parallel)."""
    calls = []
    original = kernels.Kernel.__call__

    def record(kernel, *args, work=None, threads=None, parallel=None):
        calls.append((kernel, args, parallel))
        original(kernel, *args, work=work, threads=threads, parallel=parallel)

    monkeypatch.setattr(kernels.Kernel, "__call__", record)
    with torch.no_grad():
        block(x)
    monkeypatch.undo()
    return calls


def merging_block(generator: torch.Generator) -> PackedBinConv2d:
    """LeNet-5's second convolution with padding: packs, merges kernel rows, then convolves."""
    block = BinConv2d(20, 50, kernel_size=5, stride=1, padding=2)
    randomize_batchnorm(block, generator)
    return PackedBinConv2d.from_block(block.eval())


def test_a_block_is_one_kernel_call_which_its_steps_replay(monkeypatch) -> None:
    """A block's forward makes one kernel call (each call from Python costs microseconds at
    batch 1); the stand-alone kernels of ``block_steps``, run on emptied buffers, rebuild
    exactly what that call wrote (``threads_report`` times those steps)."""
    generator = torch.Generator().manual_seed(21)
    block = merging_block(generator)
    x = torch.randn(2, 20, 9, 8, generator=generator)
    calls = recorded_block_call(block, x, monkeypatch)
    assert [kernel for kernel, _, _ in calls] == [kernels.xnor_block]
    args = calls[0][1]
    steps = kernels.block_steps(*args)
    assert [kernel for kernel, _, _ in steps] == [kernels.pack_nchw, kernels.merge_kernel_rows, kernels.xnor_conv]
    written = [args[2], args[3], args[5]]  # packed, merged, out
    expected = [array.copy() for array in written]
    for array in written:
        array[...] = 0
    for kernel, step_args, work in steps:
        kernel(*step_args, work=work, threads=1)
    for array, wanted in zip(written, expected):
        np.testing.assert_array_equal(array, wanted)
    assert expected[2].any()


def test_a_block_reuses_its_scratch_buffers_without_leftovers() -> None:
    """The packed input and merged rows are kept from call to call (per Python thread): a call
    after another input gives exactly what a fresh block gives, with the same buffers."""
    generator = torch.Generator().manual_seed(5)
    block = merging_block(generator)
    fresh = copy.deepcopy(block)
    first, second = (torch.randn(2, 20, 9, 8, generator=generator) for _ in range(2))
    with torch.no_grad():
        block(first)
        (plan,) = block._plans.values()
        scratch = (plan.packed, plan.merged)
        assert plan.packed.size > 0 and plan.merged.size > 0
        assert torch.equal(block(second), fresh(second))
        (same_plan,) = block._plans.values()
        assert same_plan is plan and plan.packed is scratch[0] and plan.merged is scratch[1]
        other_thread: list = []
        worker = threading.Thread(target=lambda: other_thread.append(block(first)))
        worker.start()
        worker.join()
        assert len(block._plans) == 2 and torch.equal(other_thread[0], fresh(first))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_the_blocks_parallel_build_gives_its_serial_result(layout: str, two_threads, monkeypatch) -> None:
    """xnor_block with every step's loop parallel (the test shapes stay below the thresholds,
    so the flags are set here) writes what its serial build writes."""
    generator = torch.Generator().manual_seed(22)
    block = merging_block(generator)
    x = torch.randn(3, 20, 7, 9, generator=generator)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    (_, args, _), = recorded_block_call(block, x, monkeypatch)
    assert args[0 if layout == "nhwc" else 1].size > 0
    # NCHW packing in bands of 2 of the 7 rows (2, 2, 2, 1), not the serial call's whole images;
    # the convolution's jobs shared by 2 workers.
    all_parallel = args[:12] + (True, True, True) + args[15:-2] + (2, 2)
    results = [[args[index].copy() for index in (2, 3, 5)]]  # what the engine's own call wrote
    for build in (kernels.xnor_block.serial, kernels.xnor_block.parallel):
        for index in (2, 3, 5):  # packed, merged, out
            all_parallel[index][...] = 0
        build(*all_parallel)
        results.append([all_parallel[index].copy() for index in (2, 3, 5)])
    for engine, serial, parallel in zip(*results):
        np.testing.assert_array_equal(serial, engine)
        np.testing.assert_array_equal(parallel, engine)


def test_starting_numbas_pool_keeps_pytorchs_thread_count() -> None:
    """numba's OpenMP layer runs on PyTorch's OpenMP runtime, and starting numba's pool set that
    runtime to NUMBA_NUM_THREADS: PyTorch, told to use one thread, then used two. A fresh process,
    since this process may have started the pool already."""
    code = ("import torch\nfrom xnornet.packed import kernels\ntorch.set_num_threads(1)\n"
            "kernels.sync_threads(2)\nprint(torch.get_num_threads(), kernels.numba.get_num_threads())")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "2"})
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["1", "2"]
