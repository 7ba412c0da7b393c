"""BinConv2d blocks: XNOR, BWN (binary_activations=False) and the activation scale K
(activation_scale=True, eq. 12); state_dict keys and the BatchNorm scale floor.

Equation numbers refer to ``notes/notes.md``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from xnornet.layers import BN_SCALE_FLOOR, BinConv2d, FloatConv2d
from conftest import ReferenceSign


EPS = 1e-4  # the blocks' BatchNorm eps (2017 value)


def eval_block(block: BinConv2d, seed: int) -> BinConv2d:
    """float64, eval mode, BatchNorm with non-trivial running statistics and positive scale."""
    generator = torch.Generator().manual_seed(seed)
    block = block.double().eval()
    channels = block.bn.num_features
    with torch.no_grad():
        block.bn.running_mean.copy_(0.3 * torch.randn(channels, generator=generator, dtype=torch.float64))
        block.bn.running_var.copy_(0.5 + torch.rand(channels, generator=generator, dtype=torch.float64))
        block.bn.weight.copy_(0.5 + torch.rand(channels, generator=generator, dtype=torch.float64))
        block.bn.bias.copy_(0.2 * torch.randn(channels, generator=generator, dtype=torch.float64))
    return block


def reference_bn(block: BinConv2d, x: torch.Tensor) -> torch.Tensor:
    bn = block.bn
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=EPS)


def hand_conv_scale(normalized: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Eq. (12) by hand: A = mean_c |I|, zero-padded, averaged over each k x k window (divisor k*k)."""
    channel_mean = normalized.abs().sum(dim=1, keepdim=True) / normalized.shape[1]
    padded = F.pad(channel_mean, (padding, padding, padding, padding))
    out_h = (padded.shape[2] - kernel) // stride + 1
    out_w = (padded.shape[3] - kernel) // stride + 1
    rows = []
    for i in range(out_h):
        cols = []
        for j in range(out_w):
            window = padded[:, :, i * stride:i * stride + kernel, j * stride:j * stride + kernel]
            cols.append(window.sum(dim=(2, 3)) / (kernel * kernel))
        rows.append(torch.stack(cols, dim=-1))
    return torch.stack(rows, dim=-2)


# --- shapes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary_activations", [True, False])
@pytest.mark.parametrize("activation_scale", [False, True])
def test_xnor_bwn_and_k_blocks_output_shapes(binary_activations: bool, activation_scale: bool) -> None:
    """Conv (padded, strided, grouped) and Linear (plain and previous_conv) blocks in all variants."""
    torch.manual_seed(0)
    options = dict(binary_activations=binary_activations, activation_scale=activation_scale)
    cases = [
        (BinConv2d(3, 5, kernel_size=3, stride=1, padding=1, **options), (2, 3, 8, 8), (2, 5, 8, 8)),
        (BinConv2d(3, 5, kernel_size=3, stride=2, padding=0, **options), (2, 3, 8, 8), (2, 5, 3, 3)),
        (BinConv2d(4, 6, kernel_size=3, stride=1, padding=1, groups=2, **options), (2, 4, 6, 6), (2, 6, 6, 6)),
        (BinConv2d(80, 7, Linear=True, previous_conv=True, size=16, **options), (2, 5, 4, 4), (2, 7)),
        (BinConv2d(10, 7, Linear=True, **options), (2, 10), (2, 7)),
    ]
    for block, in_shape, out_shape in cases:
        x = torch.randn(*in_shape, requires_grad=True)
        out = block(x)
        assert out.shape == out_shape
        out.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


# --- BWN -----------------------------------------------------------------------------------------


def test_bwn_input_is_real_and_gradient_passes_where_abs_bn_x_at_least_one() -> None:
    """BWN: the conv sees bn(x) itself (no sign), so the input gradient is non-zero where
    |bn(x)| >= 1; the XNOR block (eq. 5) zeroes it exactly there."""
    torch.manual_seed(1)
    generator = torch.Generator().manual_seed(2)
    x = 2.0 * torch.randn(3, 4, 6, 6, generator=generator, dtype=torch.float64)
    upstream = torch.randn(3, 5, 6, 6, generator=generator, dtype=torch.float64)
    bwn = eval_block(BinConv2d(4, 5, kernel_size=3, stride=1, padding=1, binary_activations=False), seed=3)
    xnor = eval_block(BinConv2d(4, 5, kernel_size=3, stride=1, padding=1), seed=3)
    xnor.load_state_dict(bwn.state_dict())

    outside = reference_bn(bwn, x).abs() >= 1
    assert outside.float().mean() > 0.2

    leaf = x.clone().requires_grad_(True)
    out = bwn(leaf)
    (grad_bwn,) = torch.autograd.grad(out, leaf, upstream)
    ref_leaf = x.clone().requires_grad_(True)
    ref_out = F.relu(F.conv2d(reference_bn(bwn, ref_leaf), bwn.conv.weight, bwn.conv.bias, padding=1))
    (ref_grad,) = torch.autograd.grad(ref_out, ref_leaf, upstream)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_bwn, ref_grad, rtol=0, atol=1e-12)
    assert (grad_bwn[outside] != 0).float().mean() > 0.9

    leaf = x.clone().requires_grad_(True)
    (grad_xnor,) = torch.autograd.grad(xnor(leaf), leaf, upstream)
    assert torch.equal(grad_xnor[outside], torch.zeros_like(grad_xnor[outside]))
    assert (grad_xnor[~outside] != 0).any()


# --- K, eq. (12) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (2, 0)])
def test_eq12_k_conv_output_and_gradient_match_hand_reference(stride: int, padding: int) -> None:
    """Eq. (12): out = relu(conv(sign(I), W) * K + b), K = box filter (kernel, stride, zero padding,
    divisor k*k) of mean_c |I|, I = bn(x); the input gradient (through the STE and through K)
    equals autograd on that hand-written expression, and is non-zero where |I| >= 1 (only K)."""
    torch.manual_seed(4)
    block = eval_block(BinConv2d(3, 4, kernel_size=3, stride=stride, padding=padding, activation_scale=True), 5)
    generator = torch.Generator().manual_seed(6)
    x = 1.5 * torch.randn(2, 3, 7, 7, generator=generator, dtype=torch.float64)

    leaf = x.clone().requires_grad_(True)
    out = block(leaf)
    upstream = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, leaf, upstream)

    ref_leaf = x.clone().requires_grad_(True)
    normalized = reference_bn(block, ref_leaf)
    scale = hand_conv_scale(normalized, 3, stride, padding)
    binary_conv = F.conv2d(ReferenceSign.apply(normalized, False), block.conv.weight, None, stride=stride, padding=padding)
    assert scale.shape == (2, 1) + binary_conv.shape[2:]
    ref_out = F.relu(binary_conv * scale + block.conv.bias.reshape(1, -1, 1, 1))
    (ref_grad,) = torch.autograd.grad(ref_out, ref_leaf, upstream)

    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)
    outside = normalized.detach().abs() >= 1
    assert outside.any()
    assert (grad[outside] != 0).any()  # only the path through K reaches these inputs
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("previous_conv", [False, True])
def test_eq12_k_linear_is_mean_abs_per_sample(previous_conv: bool) -> None:
    """Eq. (12) for a linear block: K = mean of |bn(x)| over each sample's input features."""
    torch.manual_seed(7)
    if previous_conv:
        block = BinConv2d(12, 5, Linear=True, previous_conv=True, size=4, activation_scale=True)
        in_shape = (4, 3, 2, 2)
    else:
        block = BinConv2d(12, 5, Linear=True, activation_scale=True)
        in_shape = (4, 12)
    block = eval_block(block, seed=8)
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(*in_shape, generator=generator, dtype=torch.float64)

    leaf = x.clone().requires_grad_(True)
    out = block(leaf)
    upstream = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, leaf, upstream)

    ref_leaf = x.clone().requires_grad_(True)
    normalized = reference_bn(block, ref_leaf).reshape(4, 12)
    scale = torch.stack([sum(v.abs() for v in row) / 12 for row in normalized]).reshape(4, 1)
    ref_out = F.relu(ReferenceSign.apply(normalized, False) @ block.linear.weight.t() * scale + block.linear.bias)
    (ref_grad,) = torch.autograd.grad(ref_out, ref_leaf, upstream)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)


# --- keys and BatchNorm ---------------------------------------------------------------------------


def test_state_dict_keys_match_2017_blocks() -> None:
    """Conv block: bn.* + conv.weight/bias; Linear block: bn.* + linear.weight/bias (2017 names)."""
    bn_keys = {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    for cls in (BinConv2d, FloatConv2d):
        conv = cls(3, 4, kernel_size=3, stride=1, padding=1, dropout=0.5)
        assert set(conv.state_dict()) == bn_keys | {"conv.weight", "conv.bias"}
        assert conv.state_dict()["conv.weight"].shape == (4, 3, 3, 3)
        linear = cls(10, 6, Linear=True)
        assert set(linear.state_dict()) == bn_keys | {"linear.weight", "linear.bias"}
        assert isinstance(linear.bn, nn.BatchNorm1d) and linear.bn.num_features == 10


def test_previous_conv_linear_block_has_batchnorm2d_over_channels() -> None:
    """previous_conv=True, size=16, input 800 (LeNet-5 bin_ip1): BatchNorm2d of 50 channels."""
    block = BinConv2d(800, 500, Linear=True, previous_conv=True, size=16)
    assert isinstance(block.bn, nn.BatchNorm2d) and block.bn.num_features == 50
    assert block.linear.weight.shape == (500, 800)
    assert block(torch.randn(2, 50, 4, 4)).shape == (2, 500)
    with pytest.raises(ValueError):
        BinConv2d(800, 500, Linear=True, previous_conv=True, size=15)


def test_batchnorm_scale_clamped_to_the_floor_a_network_sets() -> None:
    """With ``bn_scale_floor`` (the 2017 LeNet-5 and NIN: 0.01) each forward clamps the BatchNorm
    scale in place; without it (the default, the 2017 AlexNet) negative scales stay as they are."""
    assert BN_SCALE_FLOOR == 0.01
    raw = torch.tensor([-1.0, 0.005, 0.01, 0.5])
    for floor, expected in ((BN_SCALE_FLOOR, torch.tensor([0.01, 0.01, 0.01, 0.5])), (None, raw)):
        for block, x in (
            (BinConv2d(4, 2, kernel_size=1, stride=1, padding=0, bn_scale_floor=floor), torch.randn(3, 4, 2, 2)),
            (FloatConv2d(4, 2, Linear=True, bn_scale_floor=floor), torch.randn(3, 4)),
        ):
            assert block.bn_scale_floor == floor
            with torch.no_grad():
                block.bn.weight.copy_(raw)
            block(x)
            block.eval()(x)
            assert torch.equal(block.bn.weight.detach(), expected)
    assert BinConv2d(4, 2, Linear=True).bn_scale_floor is None
    with pytest.raises(ValueError, match="bn_scale_floor"):
        BinConv2d(4, 2, Linear=True, bn_scale_floor=float("nan"))
