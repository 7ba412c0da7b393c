"""Numba kernels of the packed engine: sign-and-pack activations, XNOR-popcount conv.

Bit convention (notes, section 8): ``+1`` is bit 1, ``-1`` is bit 0. Channels are
packed into 64-bit words (held as ``int64``; only the bits matter), bit ``b`` of
word ``k`` being channel ``64 k + b`` of its group; the unused high bits of a
group's last word are 0 in both activations and weights, so they never differ.

Layouts:

- packed activations ``[N, H + 2p, W + 2p, G, CW]``: per position and group,
  ``CW = ceil(C_g / 64)`` words; the padding ring is all-zero words;
- packed weights ``[G, OB, R, BO]``: ``R = KH * KW * CW`` reduction words (tap
  major, word minor; zero rows round ``R`` up to a multiple of 4) and the ``O_g``
  output channels of a group cut into ``OB`` blocks of ``BO`` (zero-padded),
  innermost so that LLVM vectorizes over them;
- ``offset [Ho or 1, Wo or 1, O]`` int32 and float output ``[N, Ho, Wo, O]``.

Padding (eq. 14 of the notes): a padded tap holds the word 0 (all ``-1``), so its
xor with the weights counts ``popcount(w)`` mismatches where the float simulation
(zero padding) counts nothing. With ``P`` the popcount of the weight words at the
padded taps of an output position and ``n_valid`` the number of real inputs,
``dot = n_valid - 2 (popcount_total - P) = offset - 2 popcount_total`` with
``offset = n_valid + 2 P`` precomputed per position (``C_g KH KW`` inside).

Each kernel is compiled twice (:class:`Kernel`): parallel over numba's threads,
and serial for one thread or small work, where starting the pool would cost more.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
import threading
import types as pytypes
from typing import Any, Callable, List, Optional, Tuple

import numba
import numpy as np
import torch
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from llvmlite import ir

WORD_BITS = 64


def choose_threading_layer() -> str:
    """Numba's OpenMP layer on Linux (GNU OpenMP), else its work queue; returns the layer asked for.

    Measured on this 2-core VM (``python -m xnornet.packed.threads_report``): a
    parallel loop starts and joins in about 2-4 µs on the OpenMP layer, against
    about 100 µs on the work queue, which at batch 1 cost more than a small
    layer's whole work. With PyTorch imported first (the engine imports it), numba's
    OpenMP layer runs on PyTorch's own GNU OpenMP runtime: ``LD_DEBUG=bindings``
    shows numba's ``GOMP_parallel`` and ``omp_set_num_threads`` bound to the libgomp
    in torch/lib, though the system's copy is loaded too; one pool serves both
    (:func:`sync_threads` keeps PyTorch's thread count). Where numba cannot load it, the
    "default" order falls back to the work queue. GNU OpenMP is not fork-safe:
    in a forked child the kernels run their serial builds (:class:`Kernel`). A
    ``NUMBA_THREADING_LAYER`` set by the user wins. Must run before the first
    parallel call.
    """
    if "NUMBA_THREADING_LAYER" in os.environ:
        return os.environ["NUMBA_THREADING_LAYER"]
    if sys.platform.startswith("linux") and ctypes.util.find_library("gomp"):
        # "default" tries these in order; numba wants all three named (TBB would be a third pool).
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]
        numba.config.THREADING_LAYER = "default"
        return "omp"
    numba.config.THREADING_LAYER = "workqueue"
    return "workqueue"


#: Starting a parallel loop costs about 2-4 µs on the OpenMP layer, about 100 µs on the work queue.
CHEAP_PARALLEL_START = choose_threading_layer() == "omp"


@intrinsic
def popcount64(typingctx, word):  # noqa: ARG001  (numba intrinsic signature)
    """``llvm.ctpop.i64``: the number of set bits of an int64 (VPOPCNTQ/POPCNT where the CPU has them)."""
    if word != types.int64:
        return None

    def codegen(context, builder, signature, args):  # noqa: ARG001
        return builder.ctpop(args[0])

    return types.int64(types.int64), codegen


@intrinsic
def fetch_add(typingctx, counter, index, value):  # noqa: ARG001  (numba intrinsic signature)
    """``counter[index] += value`` as one atomic operation (LLVM ``atomicrmw add``); returns the
    value before. For handing out jobs to threads (no ordering of other memory is implied)."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64 and counter.ndim == 1):
        return None

    def codegen(context, builder, signature, args):  # noqa: ARG001
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, array, [args[1]])
        return builder.atomic_rmw("add", pointer, args[2], "monotonic")

    return types.int64(counter, types.intp, types.int64), codegen


def _ge_bits_intrinsic(width: int) -> Any:
    """An intrinsic ``ge_bits(a, a_start, b, b_start)``: an int64 whose bit ``i`` (``i < width``) is
    ``a[a_start + i] >= b[b_start + i]``, for 1-D C-contiguous arrays of one float or signed
    integer dtype.

    One vector compare of ``width`` lanes whose mask is the word (AVX-512: a compare into a mask
    register), where a loop of byte flags gathered into bits took several instructions per bit.
    Floats compare ordered (a NaN gives 0), as ``>=`` does. The caller keeps both ranges inside
    their arrays: the lanes are loaded without bounds checks.
    """

    def typer(typingctx, a, a_start, b, b_start):  # noqa: ARG001  (numba intrinsic signature)
        if not all(isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C"
                   for array in (a, b)):
            return None
        if a.dtype != b.dtype or not (isinstance(a.dtype, types.Float)
                                      or (isinstance(a.dtype, types.Integer) and a.dtype.signed)):
            return None

        def codegen(context, builder, signature, args):  # noqa: ARG001
            lanes = ir.VectorType(context.get_value_type(a.dtype), width)

            def load(array_type, array, start):
                structure = context.make_array(array_type)(context, builder, array)
                pointer = cgutils.get_item_pointer(context, builder, array_type, structure, [start])
                loaded = builder.load(builder.bitcast(pointer, lanes.as_pointer()))
                loaded.align = a.dtype.bitwidth // 8  # element alignment: the start is any index
                return loaded

            left, right = load(a, args[0], args[1]), load(b, args[2], args[3])
            if isinstance(a.dtype, types.Float):
                mask = builder.fcmp_ordered(">=", left, right)
            else:
                mask = builder.icmp_signed(">=", left, right)
            return builder.zext(builder.bitcast(mask, ir.IntType(width)), ir.IntType(64))

        return types.int64(a, types.intp, b, types.intp), codegen

    typer.__name__ = f"ge_bits{width}"
    return intrinsic(typer)


ge_bits64, ge_bits32, ge_bits16, ge_bits8 = (_ge_bits_intrinsic(width) for width in (64, 32, 16, 8))


@njit(inline="always", cache=True)
def _ge_word(a, a_start, b, b_start, count):  # pragma: no cover  (compiled)
    """The word whose bit ``i`` is ``a[a_start + i] >= b[b_start + i]`` for ``i < count`` (at most
    64), the higher bits 0: vector compares of 64, 32, 16 and 8 lanes, then one at a time."""
    if count >= WORD_BITS:
        return ge_bits64(a, a_start, b, b_start)
    word = np.int64(0)
    done = 0
    if count - done >= 32:
        word |= ge_bits32(a, a_start + done, b, b_start + done) << done
        done += 32
    if count - done >= 16:
        word |= ge_bits16(a, a_start + done, b, b_start + done) << done
        done += 16
    if count - done >= 8:
        word |= ge_bits8(a, a_start + done, b, b_start + done) << done
        done += 8
    for i in range(done, count):
        word |= np.int64(a[a_start + i] >= b[b_start + i]) << i
    return word


@njit(inline="always", cache=True)
def _ge_words(a, a_start, b, b_start, count, dst, dst_start):  # pragma: no cover  (compiled)
    """``count`` comparisons ``a[a_start + i] >= b[b_start + i]`` as ``ceil(count / 64)`` words
    (:func:`_ge_word`), written to ``dst[dst_start:]``; the last word's unused high bits are 0."""
    for k in range((count + WORD_BITS - 1) // WORD_BITS):
        offset = k * WORD_BITS
        dst[dst_start + k] = _ge_word(a, a_start + offset, b, b_start + offset, min(WORD_BITS, count - offset))


@njit(cache=True)
def _pack_nhwc_row(x, threshold, groups, padding, out, job):  # pragma: no cover  (compiled)
    """Row ``job`` (image ``job // H``, row ``job % H``) of :func:`pack_nhwc`."""
    height, width, channels = x.shape[1], x.shape[2], x.shape[3]
    per_group = channels // groups
    n = job // height
    h = job - n * height
    for w in range(width):
        pixel = x[n, h, w]
        dst = out[n, h + padding, w + padding]
        for g in range(groups):
            _ge_words(pixel, g * per_group, threshold, g * per_group, per_group, dst[g], 0)


@njit(cache=True)
def _pack_nchw_rows(x, threshold, groups, padding, out, rows, job):  # pragma: no cover  (compiled)
    """Job ``job`` of :func:`pack_nchw`: ``rows`` rows of one image. Each channel's contiguous
    rows OR its bit into the words of all their positions at once (vectorized over positions);
    reading a channel's rows in one stretch, rather than one row of every channel, is what keeps
    a large NCHW batch fast (channels lie a whole plane apart)."""
    channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    words = out.shape[4]
    per_group = channels // groups
    chunks = (height + rows - 1) // rows
    n = job // chunks
    first = (job - n * chunks) * rows
    stop = min(height, first + rows)
    row_words = np.zeros((stop - first, groups * words, width), np.int64)
    for c in range(channels):
        g = c // per_group
        local = c - g * per_group
        k = local // WORD_BITS
        shift = np.int64(local - k * WORD_BITS)
        t = threshold[c]
        for h in range(first, stop):
            values = x[n, c, h]
            target = row_words[h - first, g * words + k]
            for w in range(width):
                target[w] |= np.int64(values[w] >= t) << shift
    for h in range(first, stop):
        for w in range(width):
            dst = out[n, h + padding, w + padding]
            for g in range(groups):
                for k in range(words):
                    dst[g, k] = row_words[h - first, g * words + k, w]


@njit(cache=True)
def _merge_row(x, kernel_w, group_channels, out, job):  # pragma: no cover  (compiled)
    """Row ``job`` (image ``job // H``, row ``job % H``) of :func:`merge_kernel_rows`."""
    height, words = x.shape[1], x.shape[4]
    groups, out_w, row_words = out.shape[3], out.shape[2], out.shape[4]
    n = job // height
    y = job - n * height
    out[n, y] = 0  # the words are ORed together below
    for g in range(groups):
        src = x[n, y, :, g]  # [W, CW]
        dst = out[n, y, :, g]  # [Wo, RW]
        for kx in range(kernel_w):
            for k in range(words):
                position = kx * group_channels + k * WORD_BITS
                index = position // WORD_BITS
                shift = position - index * WORD_BITS
                for ox in range(out_w):  # the same shift for every column: a vectorizable loop
                    dst[ox, index] |= src[ox + kx, k] << shift
                if shift > 0 and index + 1 < row_words:
                    # a logical right shift: the arithmetic one, then the sign copies masked off
                    low_bits = (np.int64(1) << shift) - 1
                    for ox in range(out_w):
                        dst[ox, index + 1] |= (src[ox + kx, k] >> (WORD_BITS - shift)) & low_bits


@njit(cache=True)
def _maxpool_row(x, kernel, stride, padding, out, out_padding, job):  # pragma: no cover  (compiled)
    """Output row ``job`` (image ``job // Ho``, row ``job % Ho``) of :func:`maxpool_bits`."""
    height, width, groups, words = x.shape[1], x.shape[2], x.shape[3], x.shape[4]
    out_h = out.shape[1] - 2 * out_padding
    out_w = out.shape[2] - 2 * out_padding
    n = job // out_h
    oy = job - n * out_h
    for ox in range(out_w):
        dst = out[n, oy + out_padding, ox + out_padding]
        for ky in range(kernel):
            iy = oy * stride - padding + ky
            if iy < 0 or iy >= height:
                continue
            for kx in range(kernel):
                ix = ox * stride - padding + kx
                if ix < 0 or ix >= width:
                    continue
                src = x[n, iy, ix]
                for g in range(groups):
                    for k in range(words):
                        dst[g, k] |= src[g, k]


@njit(cache=True)
def _conv_job_count(x, weight, out, limit, rows_per_job):  # pragma: no cover  (compiled)
    """How many jobs :func:`_conv_job` splits a convolution into."""
    out_h = out.shape[1]
    chunks = (out_h + rows_per_job - 1) // rows_per_job
    return x.shape[0] * chunks * x.shape[3] * weight.shape[1]


@njit(cache=True)
def _conv_job(x, weight, offset, stride, kernel_h, kernel_w, alpha, bias, scale, out,
              limit, out_bits, out_padding, rows_per_job, job):  # pragma: no cover  (compiled)
    """Job ``job`` of :func:`xnor_conv`: ``rows_per_job`` output rows of one image, one group
    and one block of output channels."""
    groups, words = x.shape[3], x.shape[4]
    blocks, reduction, block = weight.shape[1], weight.shape[2], weight.shape[3]
    emit_bits = limit.size > 0
    out_h, out_w = out.shape[1], out.shape[2]
    out_channels = limit.size if emit_bits else out.shape[3]
    per_group = out_channels // groups
    per_position_offset = offset.shape[0] > 1
    has_scale = scale.size > 0
    chunks = (out_h + rows_per_job - 1) // rows_per_job
    jobs_per_image = chunks * groups * blocks
    n = job // jobs_per_image
    rest = job - n * jobs_per_image
    chunk = rest // (groups * blocks)
    rest -= chunk * (groups * blocks)
    g = rest // blocks
    b = rest - g * blocks
    kernel = weight[g, b]
    first = g * per_group + b * block
    stop = first + min(block, per_group - b * block)
    # One 2-D array each (not one per position): LLVM then needs a single alias check to vectorize.
    acc = np.zeros((2, block), np.int64)
    values = np.zeros((2, reduction), np.int64)  # the rounding-up tail stays 0
    dots = np.empty(stop - first if emit_bits else 0, np.int32)  # a position's dot products (bit output)
    alphas, biases = alpha[first:stop], bias[first:stop]
    for oy in range(chunk * rows_per_job, min(out_h, (chunk + 1) * rows_per_job)):
        for ox0 in range(0, out_w, 2):
            ox1 = min(ox0 + 1, out_w - 1)  # an odd last position is computed twice, written once
            r = 0
            for ky in range(kernel_h):
                row = x[n, oy * stride + ky]
                for kx in range(kernel_w):
                    pixel0 = row[ox0 * stride + kx, g]
                    pixel1 = row[ox1 * stride + kx, g]
                    for k in range(words):
                        values[0, r] = pixel0[k]
                        values[1, r] = pixel1[k]
                        r += 1
            acc[:] = 0
            for j in range(0, reduction, 4):
                a0, a1, a2, a3 = values[0, j], values[0, j + 1], values[0, j + 2], values[0, j + 3]
                b0, b1, b2, b3 = values[1, j], values[1, j + 1], values[1, j + 2], values[1, j + 3]
                for o in range(block):
                    w0, w1, w2, w3 = kernel[j, o], kernel[j + 1, o], kernel[j + 2, o], kernel[j + 3, o]
                    acc[0, o] += (popcount64(a0 ^ w0) + popcount64(a1 ^ w1)) + (
                        popcount64(a2 ^ w2) + popcount64(a3 ^ w3))
                    acc[1, o] += (popcount64(b0 ^ w0) + popcount64(b1 ^ w1)) + (
                        popcount64(b2 ^ w2) + popcount64(b3 ^ w3))
            for which in range(2):
                ox = ox0 + which
                if ox >= out_w:
                    break
                # Contiguous slices and max(): this loop vectorizes (per-element indexing did not).
                at_y, at_x = (oy, ox) if per_position_offset else (0, 0)
                positions = offset[at_y, at_x, first:stop]
                ones = acc[which]
                if emit_bits:
                    for o in range(stop - first):  # vectorizes
                        dots[o] = positions[o] - 2 * ones[o]
                    _ge_words(dots, 0, limit, first, stop - first,
                              out_bits[n, oy + out_padding, ox + out_padding, 0], first // WORD_BITS)
                    continue
                factor = scale[n, oy, ox] if has_scale else np.float32(1.0)
                dst = out[n, oy, ox, first:stop]
                for o in range(stop - first):
                    value = alphas[o] * np.float32(positions[o] - 2 * ones[o]) * factor + biases[o]
                    dst[o] = max(value, np.float32(0.0))


#: Jobs per worker from which :func:`_conv_worker` hands out the last quarter one at a time.
CLAIMED_FROM = 16


@njit(cache=True)
def _conv_worker(worker, workers, claimed, x, weight, offset, stride, kernel_h, kernel_w, alpha, bias, scale, out,
                 limit, out_bits, out_padding, rows_per_job):  # pragma: no cover  (compiled)
    """Worker ``worker`` of ``workers`` running :func:`_conv_job` s: its own contiguous share of the
    first three quarters of the jobs, then the rest one at a time, each taken from the shared
    count ``claimed`` (int64 [1], 0 at the start). A thread that starts late or runs slow (the
    other tenants of a shared machine) then holds up the others by one job at most, not by its
    whole share. With fewer than :data:`CLAIMED_FROM` jobs per worker (NIN at batch 1) all jobs
    go in fixed shares."""
    jobs = _conv_job_count(x, weight, out, limit, rows_per_job)
    shared = jobs - jobs // 4 if jobs >= CLAIMED_FROM * workers else jobs
    for job in range(worker * shared // workers, (worker + 1) * shared // workers):
        _conv_job(x, weight, offset, stride, kernel_h, kernel_w, alpha, bias, scale, out,
                  limit, out_bits, out_padding, rows_per_job, job)
    while shared < jobs:
        job = shared + fetch_add(claimed, 0, 1)
        if job >= jobs:
            break
        _conv_job(x, weight, offset, stride, kernel_h, kernel_w, alpha, bias, scale, out,
                  limit, out_bits, out_padding, rows_per_job, job)


def _pack_nhwc(x, threshold, groups, padding, out):  # pragma: no cover  (compiled)
    """Bits ``x[n, h, w, c] >= threshold[c]`` of a C-contiguous float32 NHWC array.

    ``out`` [N, H + 2 padding, W + 2 padding, G, CW] int64 must be zero on the padding ring.
    """
    for job in prange(x.shape[0] * x.shape[1]):
        _pack_nhwc_row(x, threshold, groups, padding, out, job)


def _pack_nchw(x, threshold, groups, padding, out, rows):  # pragma: no cover  (compiled)
    """``pack_nhwc`` for a C-contiguous NCHW array (no transposed float copy needed), ``rows`` rows
    of an image per job."""
    for job in prange(x.shape[0] * ((x.shape[2] + rows - 1) // rows)):
        _pack_nchw_rows(x, threshold, groups, padding, out, rows, job)


def _xnor_conv(x, weight, offset, stride, kernel_h, kernel_w, alpha, bias, scale, out,
               limit, out_bits, out_padding, rows_per_job, workers):  # pragma: no cover  (compiled)
    """``out = relu(alpha * dot * scale + bias)``, ``dot`` the XNOR-popcount convolution (module docstring).

    ``scale`` [N, Ho, Wo] float32 is the activation scale K (eq. 12), or an empty
    array for none.

    Bit output instead (``limit`` non-empty, int32 [O]): the sign bits of the next
    block, ``dot >= limit[o]``, written packed into ``out_bits``
    ``[N, Ho + 2 out_padding, Wo + 2 out_padding, 1, ceil(O / 64)]`` (its padding
    ring untouched); ``out`` is then only read for its shape, ``[N, Ho, Wo, 0]``.
    Output blocks must start at multiples of 64 (one job owns each word).

    Each parallel job computes ``rows_per_job`` output rows (fewer jobs: less
    per-job set-up) for one block of output channels, two positions at a time (each weight word is loaded once
    for both) and four reduction words at a time (one accumulator update per
    four popcounts); the inner loop runs over contiguous output channels, which
    LLVM vectorizes (VPOPCNTQ where the CPU has it). ``weight`` has ``R``
    rounded up to a multiple of 4 with zero rows, which add nothing. ``workers``
    (the thread count; passed in, as asking numba inside would keep numba from caching
    the build) share the jobs as :func:`_conv_worker` says.
    """
    claimed = np.zeros(1, np.int64)
    for worker in prange(workers):  # one worker per thread
        _conv_worker(worker, workers, claimed, x, weight, offset, stride, kernel_h, kernel_w, alpha, bias, scale,
                     out, limit, out_bits, out_padding, rows_per_job)


def _merge_kernel_rows(x, kernel_w, group_channels, out):  # pragma: no cover  (compiled)
    """Each stride-1 window row as one bit stream: the layout of ``pack.merges_kernel_rows``.

    ``x`` [N, H, W, G, CW] (padded, one pixel per word group) -> ``out`` [N, H,
    W - kernel_w + 1, G, RW] (every word written; it may hold anything before): bit ``kx * C_g + c`` of
    ``out[n, y, x, g]`` is channel ``c`` of pixel ``x + kx``. The unused high bits of
    each pixel's last word are 0, so whole words can be shifted in.
    """
    for job in prange(x.shape[0] * x.shape[1]):
        _merge_row(x, kernel_w, group_channels, out, job)


def _maxpool_bits(x, kernel, stride, padding, out, out_padding):  # pragma: no cover  (compiled)
    """Max pooling of sign bits: the OR of each window's words (a max of 0/1 values).

    ``x`` [N, H, W, G, CW] without a padding ring; ``out`` [N, Ho + 2 out_padding,
    Wo + 2 out_padding, G, CW] with a zero ring. Window positions outside the input
    are skipped, as PyTorch's max pooling pads with -inf.
    """
    for job in prange(x.shape[0] * (out.shape[1] - 2 * out_padding)):
        _maxpool_row(x, kernel, stride, padding, out, out_padding, job)


def _xnor_block(x_nhwc, x_nchw, packed, merged, scale, out, out_bits, threshold, groups, padding, merge_width,
                group_channels, pack_parallel, merge_parallel, conv_parallel, weight, offset, stride, kernel_h,
                kernel_w, alpha, bias, limit, out_padding, rows_per_job, pack_rows, workers):  # pragma: no cover
    """A whole packed block in one call (each call from Python costs microseconds).

    1. Float input (``x_nhwc`` or ``x_nchw`` non-empty, the other empty): its
       sign bits packed into ``packed`` as by :func:`pack_nhwc` / :func:`pack_nchw`
       (``pack_rows`` rows per job).
       Bit input: ``packed`` holds it already, and both float arrays are empty.
    2. ``merged`` non-empty: the kernel rows of ``packed`` merged into it as by
       :func:`merge_kernel_rows` (``merge_width`` taps of ``group_channels``), and the
       convolution reads ``merged``.
    3. The convolution of :func:`xnor_conv` (its arguments ``weight`` to ``rows_per_job``, ``workers``, and
       ``scale``, ``out``, ``out_bits``).

    The arrays that change from call to call come first; the rest is fixed per block and
    input shape (the engine keeps them in one tuple).

    Each step's loop runs on numba's threads when its ``*_parallel`` flag is set
    (in the parallel build; the serial build runs every step serially).
    """
    if x_nhwc.size > 0:
        if pack_parallel:
            for job in prange(x_nhwc.shape[0] * x_nhwc.shape[1]):
                _pack_nhwc_row(x_nhwc, threshold, groups, padding, packed, job)
        else:
            for job in range(x_nhwc.shape[0] * x_nhwc.shape[1]):
                _pack_nhwc_row(x_nhwc, threshold, groups, padding, packed, job)
    elif x_nchw.size > 0:
        jobs = x_nchw.shape[0] * ((x_nchw.shape[2] + pack_rows - 1) // pack_rows)
        if pack_parallel:
            for job in prange(jobs):
                _pack_nchw_rows(x_nchw, threshold, groups, padding, packed, pack_rows, job)
        else:
            for job in range(jobs):
                _pack_nchw_rows(x_nchw, threshold, groups, padding, packed, pack_rows, job)
    source = packed
    if merged.size > 0:
        if merge_parallel:
            for job in prange(packed.shape[0] * packed.shape[1]):
                _merge_row(packed, merge_width, group_channels, merged, job)
        else:
            for job in range(packed.shape[0] * packed.shape[1]):
                _merge_row(packed, merge_width, group_channels, merged, job)
        source = merged
    claimed = np.zeros(1, np.int64)
    if conv_parallel:
        for worker in prange(workers):
            _conv_worker(worker, workers, claimed, source, weight, offset, stride, kernel_h, kernel_w, alpha, bias,
                         scale, out, limit, out_bits, out_padding, rows_per_job)
    else:
        _conv_worker(0, 1, claimed, source, weight, offset, stride, kernel_h, kernel_w, alpha, bias, scale, out,
                     limit, out_bits, out_padding, rows_per_job)


def _renamed(function: Callable, suffix: str) -> Callable:
    """The same Python function under another name: numba caches each name's build separately."""
    twin = pytypes.FunctionType(function.__code__, function.__globals__, function.__name__ + suffix,
                                function.__defaults__, function.__closure__)
    twin.__qualname__ = function.__qualname__ + suffix
    twin.__doc__ = function.__doc__
    return twin


class Kernel:
    """A kernel compiled twice: with ``prange`` on numba's threads, and serial.

    Starting a parallel loop costs more than a small layer's whole work at
    batch 1; calls with ``work`` (roughly, operations) below ``serial_below``, or
    with one thread, run the serial build. So do calls from a process forked
    after this module was imported: GNU OpenMP cannot run a parallel loop in a
    child forked from a process that used it (numba stops such a child).
    """

    def __init__(self, function: Callable, serial_below: int) -> None:
        self.parallel = njit(parallel=True, cache=True)(function)
        self.serial = njit(cache=True)(_renamed(function, "_serial"))
        self.serial_below = serial_below
        # Set in a child forked by Python (multiprocessing, os.fork): an attribute read per call,
        # where asking for the process id cost a quarter of a microsecond.
        self.forked = False
        os.register_at_fork(after_in_child=self._mark_forked)
        self.__doc__ = function.__doc__

    def _mark_forked(self) -> None:
        self.forked = True

    def runs_parallel(self, work: Optional[int], threads: Optional[int], parallel: Optional[bool] = None) -> bool:
        """Whether a call takes the parallel build: more than one thread, ``parallel`` if given
        (else ``work`` at or above ``serial_below``), and not in a forked child."""
        wanted = parallel if parallel is not None else (work is None or work >= self.serial_below)
        return threads != 1 and wanted and not self.forked

    def __call__(self, *args: Any, work: Optional[int] = None, threads: Optional[int] = None,
                 parallel: Optional[bool] = None) -> None:
        """Run on ``threads`` threads (default: numba's current count); serial for one or for small work
        (``parallel``, when given, decides instead of ``work``).

        Only the parallel path asks numba for its thread count (that query costs
        microseconds, as much as a small layer's whole kernel).
        """
        if not self.runs_parallel(work, threads, parallel):
            self.serial(*args)
            return
        count = sync_threads(threads) if threads is not None else numba.get_num_threads()
        if count == 1:
            self.serial(*args)
        else:
            self.parallel(*args)


def rows_per_job(out_h: int, n_batch: int, threads: int, parallel: bool, jobs_per_thread: int = 8) -> int:
    """Rows per job of a kernel that splits images into row bands (:func:`xnor_conv`'s output rows,
    :func:`pack_nchw`'s input rows): whole images when serial, else about ``jobs_per_thread``
    jobs per thread (each job sets up its own buffers)."""
    if not parallel:
        return max(1, out_h)
    return max(1, min(out_h, (n_batch * out_h) // (jobs_per_thread * max(1, threads))))


#: Jobs per thread of :func:`pack_nchw`: few, long jobs, each reading its channels' rows in long
#: stretches (what made NCHW packing fast, packed README).
PACK_JOBS_PER_THREAD = 2


def conv_work(images: int, out_h: int, out_w: int, out_channels: int, weight: np.ndarray) -> int:
    """The word operations of an :func:`xnor_conv` call (its ``work``): ``weight`` holds ``R``
    reduction words per output channel."""
    return images * out_h * out_w * out_channels * weight.shape[2]


def block_steps(*args: Any) -> List[Tuple["Kernel", tuple, int]]:
    """The calls of the stand-alone kernels that one :func:`xnor_block` call makes, in order:
    ``(kernel, arguments, work)`` with the block's own arrays (``threads_report`` times them)."""
    (x_nhwc, x_nchw, packed, merged, scale, out, out_bits, threshold, groups, padding, merge_width, group_channels,
     _, _, _, weight, offset, stride, kernel_h, kernel_w, alpha, bias, limit, out_padding, rows, pack_rows,
     workers) = args
    steps: List[Tuple[Kernel, tuple, int]] = []
    if x_nhwc.size > 0:
        steps.append((pack_nhwc, (x_nhwc, threshold, groups, padding, packed), x_nhwc.size))
    if x_nchw.size > 0:
        steps.append((pack_nchw, (x_nchw, threshold, groups, padding, packed, pack_rows), x_nchw.size))
    if merged.size > 0:
        steps.append((merge_kernel_rows, (packed, merge_width, group_channels, merged), packed.size))
    source = merged if merged.size > 0 else packed
    steps.append((xnor_conv, (source, weight, offset, stride, kernel_h, kernel_w, alpha, bias, scale, out,
                              limit, out_bits, out_padding, rows, workers),
                  conv_work(source.shape[0], out.shape[1], out.shape[2],
                            limit.size if limit.size > 0 else out.shape[3], weight)))
    return steps


# The thresholds come from measurements on a quiet 2-core machine, serial against
# parallel build of each kernel call in LeNet-5, NIN and AlexNet at batch 1 and 4
# (``python -m xnornet.packed.threads_report``, CIFAR_10/logs/packed_threads.jsonl);
# the work-queue ones, from the same comparison at batch 1 before the OpenMP layer
# was used.
#: work = values read; the serial builds handle a few per nanosecond.
pack_nhwc = Kernel(_pack_nhwc, serial_below=100_000 if CHEAP_PARALLEL_START else 2_000_000)
pack_nchw = Kernel(_pack_nchw, serial_below=10_000 if CHEAP_PARALLEL_START else 2_000_000)
#: work = 64-bit word operations; the serial build does about ten per nanosecond.
xnor_conv = Kernel(_xnor_conv, serial_below=30_000 if CHEAP_PARALLEL_START else 30_000_000)
#: work = words read.
merge_kernel_rows = Kernel(_merge_kernel_rows, serial_below=5_000 if CHEAP_PARALLEL_START else 2_000_000)
#: work = words read.
maxpool_bits = Kernel(_maxpool_bits, serial_below=5_000 if CHEAP_PARALLEL_START else 2_000_000)
#: A whole block (:func:`_xnor_block`): callers choose the build per step, from the thresholds above.
xnor_block = Kernel(_xnor_block, serial_below=0)


class _SetByUs(threading.local):
    """numba's thread count as :func:`sync_threads` last set it in this Python thread (numba keeps
    one count per thread); 0 before the first call. Asking numba costs about a microsecond per
    call, as much as a tenth of a small block's kernel at batch 1."""

    count = 0


#: A memo of numba's per-thread state, not a setting: a count set directly with
#: numba.set_num_threads is not seen here (use sync_threads).
_NUMBA_THREADS = _SetByUs()


def usable_threads(threads: int) -> int:
    """The thread count numba can run for a wish of ``threads``: 1 to NUMBA_NUM_THREADS."""
    return max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))


def sync_threads(threads: int) -> int:
    """Run numba's parallel loops on ``threads`` threads (at most NUMBA_NUM_THREADS); returns that count.

    PyTorch's thread count is left as it was. With the OpenMP layer, numba's loops
    run on the GNU OpenMP runtime PyTorch loaded first (its libgomp serves numba's
    calls too), and numba's first query starts its pool by setting that runtime's
    thread count to NUMBA_NUM_THREADS: PyTorch then reported and used every core
    (a process started with OMP_NUM_THREADS=1 ran its float convolutions on two).
    """
    if _NUMBA_THREADS.count == threads:  # every call of a block: the count set last time
        return threads
    threads = usable_threads(threads)
    if _NUMBA_THREADS.count == threads:
        return threads
    torch_threads = torch.get_num_threads()
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    _NUMBA_THREADS.count = threads
    return threads


def threading_layer() -> str:
    """The numba threading layer in use (after the first parallel call) or configured."""
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel function has run yet
        return str(numba.config.THREADING_LAYER)


def empty_scale() -> np.ndarray:
    """The ``scale`` argument of :func:`xnor_conv` meaning "no activation scale"."""
    return np.empty((0, 0, 0), np.float32)


def no_bit_output() -> tuple:
    """The ``limit, out_bits`` arguments of :func:`xnor_conv` meaning "float output"."""
    return np.empty(0, np.int32), np.empty((0, 0, 0, 0, 0), np.int64)
