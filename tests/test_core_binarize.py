"""Binarization primitives: sign (eq. 2), activation STE (eq. 5), alpha (eq. 1),
binarized weight (eq. 3) and centring + clamping (eq. 8), against hand computations.

Equation numbers refer to ``notes/notes.md``.
"""

from __future__ import annotations

import torch

from xnornet.binarize import BinActive, binary_sign
from xnornet.binop import binarize_weight, center_and_clamp, filter_alpha


def test_eq2_bin_active_forward_is_plus_minus_one_even_at_exact_zeros() -> None:
    """Eq. (2): +1 for x >= 0 (0.0 and -0.0 included), -1 for x < 0; never 0."""
    x = torch.tensor([-3.0, -1.0, -1e-30, -0.0, 0.0, 1e-30, 0.5, 1.0, 7.0], dtype=torch.float64)
    expected = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    y = BinActive.apply(x)
    assert y.dtype == torch.float64
    assert torch.equal(y, expected)


def test_eq2_bin_active_random_tensor_with_zeros_has_exactly_two_values() -> None:
    """Eq. (2) on a tensor with many exact zeros (ReLU output): values are only -1 and +1."""
    generator = torch.Generator().manual_seed(0)
    positive = torch.relu(torch.randn(4, 6, 5, 5, generator=generator))
    x = positive - torch.relu(torch.randn(4, 6, 5, 5, generator=generator))
    assert (x == 0).sum() > 10
    y = BinActive.apply(x)
    assert set(y.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(y[x == 0], torch.ones_like(y[x == 0]))
    assert torch.equal(y[x < 0], -torch.ones_like(y[x < 0]))
    assert torch.equal(binary_sign(x), y)


def test_eq5_bin_active_gradient_mask_at_and_around_plus_minus_one() -> None:
    """Eq. (5): gradient passed where |x| < 1, zeroed where |x| >= 1 (|x| = 1 exactly included)."""
    one = torch.tensor(1.0, dtype=torch.float64)
    just_below_one = torch.nextafter(one, torch.tensor(0.0, dtype=torch.float64)).item()
    x = torch.tensor(
        [-2.5, -1.0 - 1e-9, -1.0, -just_below_one, -0.5, -0.0, 0.0, 0.5, just_below_one, 1.0, 1.0 + 1e-9, 4.0],
        dtype=torch.float64,
        requires_grad=True,
    )
    passed = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0], dtype=torch.float64)
    upstream = torch.arange(1, 13, dtype=torch.float64) * torch.tensor([1.0, -1.0]).repeat(6).double()
    (grad,) = torch.autograd.grad(BinActive.apply(x), x, grad_outputs=upstream)
    assert torch.equal(grad, upstream * passed)


def _hand_alpha(weight: torch.Tensor) -> list:
    """Eq. (1) with explicit loops: mean of |W| over every element of one output filter."""
    alphas = []
    for o in range(weight.shape[0]):
        total = 0.0
        count = 0
        for value in weight[o].reshape(-1).tolist():
            total += abs(value)
            count += 1
        alphas.append(total / count)
    return alphas


def test_eq1_alpha_per_output_filter_conv_weight() -> None:
    """Eq. (1) for a 4-D conv weight: one alpha per output filter, n = C_in * kh * kw."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(5, 3, 2, 3, generator=generator, dtype=torch.float64)
    alpha = filter_alpha(weight)
    assert alpha.shape == (5, 1, 1, 1)
    torch.testing.assert_close(alpha.reshape(-1), torch.tensor(_hand_alpha(weight), dtype=torch.float64),
                               rtol=0, atol=1e-14)


def test_eq1_alpha_per_output_filter_linear_weight() -> None:
    """Eq. (1) for a 2-D linear weight: one alpha per output neuron, n = in_features."""
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(4, 7, generator=generator, dtype=torch.float64)
    alpha = filter_alpha(weight)
    assert alpha.shape == (4, 1)
    torch.testing.assert_close(alpha.reshape(-1), torch.tensor(_hand_alpha(weight), dtype=torch.float64),
                               rtol=0, atol=1e-14)


def test_eq3_binarized_weight_is_alpha_times_sign_with_zero_mapped_to_plus_alpha() -> None:
    """Eq. (3): W~ = alpha * sign(W) per filter, elementwise by hand; a zero weight gives +alpha."""
    generator = torch.Generator().manual_seed(3)
    for shape in ((3, 2, 3, 3), (4, 6)):
        weight = torch.randn(*shape, generator=generator, dtype=torch.float64)
        weight.view(-1)[0] = 0.0
        weight.view(-1)[-1] = -0.0
        alphas = _hand_alpha(weight)
        binary = binarize_weight(weight)
        flat_w = weight.reshape(shape[0], -1)
        flat_b = binary.reshape(shape[0], -1)
        for o in range(shape[0]):
            for i in range(flat_w.shape[1]):
                expected = alphas[o] if flat_w[o, i].item() >= 0 else -alphas[o]
                assert abs(flat_b[o, i].item() - expected) <= 1e-14
            assert flat_b[o].abs().unique().numel() == 1
        assert binary.reshape(-1)[0] > 0 and binary.reshape(-1)[-1] > 0


def _hand_center_and_clamp(weight: torch.Tensor, clamp: bool) -> torch.Tensor:
    """Eq. (8) with loops: per output filter and spatial position, subtract the mean over dim 1."""
    out = weight.clone()
    c_in = weight.shape[1]
    rest = weight.shape[2:]
    positions = [()] if not rest else [(u, v) for u in range(rest[0]) for v in range(rest[1])]
    for o in range(weight.shape[0]):
        for pos in positions:
            mean = sum(weight[(o, c, *pos)].item() for c in range(c_in)) / c_in
            for c in range(c_in):
                value = weight[(o, c, *pos)].item() - mean
                if clamp:
                    value = min(1.0, max(-1.0, value))
                out[(o, c, *pos)] = value
    return out


def test_eq8_center_over_dim1_makes_each_channel_fibre_zero_mean() -> None:
    """Eq. (8) without clamping active (small weights): the mean over dim 1 of the result is ~0
    for every output filter and spatial position, and only the dim-1 mean was subtracted."""
    generator = torch.Generator().manual_seed(4)
    for shape in ((4, 5, 3, 3), (6, 9)):
        weight = 0.4 * torch.rand(*shape, generator=generator, dtype=torch.float64) + 0.1  # far from zero mean
        centered = center_and_clamp(weight)
        assert centered.abs().max() < 1  # the clamp did nothing here
        fibre_mean = centered.mean(dim=1)
        assert fibre_mean.abs().max() < 1e-15
        torch.testing.assert_close(centered, _hand_center_and_clamp(weight, clamp=False), rtol=0, atol=1e-15)
        if weight.dim() == 4:
            # Not the mean over the whole filter: that would leave non-zero fibre means here.
            whole_filter = weight - weight.mean(dim=(1, 2, 3), keepdim=True)
            assert whole_filter.mean(dim=1).abs().max() > 1e-3


def test_eq8_center_then_clamp_to_minus_one_one() -> None:
    """Eq. (8): centring first, then clamp to [-1, 1] (clamp active on large weights)."""
    generator = torch.Generator().manual_seed(5)
    for shape in ((4, 3, 2, 2), (5, 8)):
        weight = 3.0 * torch.randn(*shape, generator=generator, dtype=torch.float64)
        result = center_and_clamp(weight)
        assert result.min() == -1.0 and result.max() == 1.0
        torch.testing.assert_close(result, _hand_center_and_clamp(weight, clamp=True), rtol=0, atol=1e-14)
        assert not torch.equal(result, weight.clamp(-1, 1))  # clamp alone is not eq. (8)
