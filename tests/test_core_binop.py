"""BinOp: binarization (eq. 8, 1, 3), bit-exact restore, selection by type, the
corrected gradient (eq. 7) against autograd, the factor (eq. 9, 11), a full
training step, and restore on errors.

Equation numbers refer to ``notes/notes.md``.
"""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from xnornet.binop import BinOp, center_and_clamp, legacy_grad_factor, scaled_sign_grad
from xnornet.layers import BinConv2d, FloatConv2d
from conftest import ReferenceSign


def surrogate_weight(weight: torch.Tensor) -> torch.Tensor:
    """alpha(W) * sign_STE(W), differentiable by autograd (alpha through |W|)."""
    alpha = weight.abs().mean(dim=tuple(range(1, weight.dim())), keepdim=True)
    return alpha * ReferenceSign.apply(weight, True)


def reference_grad(weight: torch.Tensor, grad_binary: torch.Tensor) -> torch.Tensor:
    """dC/dW by autograd through the surrogate, given dC/dW~ = ``grad_binary``."""
    leaf = weight.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(surrogate_weight(leaf), leaf, grad_outputs=grad_binary)
    return grad


class SmallNet(nn.Sequential):
    """Plain Conv2d -> FloatConv2d -> BinConv2d (conv) -> pool -> BinConv2d (Linear) -> plain Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.float_block = FloatConv2d(4, 6, kernel_size=3, stride=1, padding=1)
        self.bin_conv = BinConv2d(6, 8, kernel_size=3, stride=1, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.bin_fc = BinConv2d(8 * 4 * 4, 12, Linear=True, previous_conv=True, size=4 * 4)
        self.last = nn.Linear(12, 3)


def make_net(seed: int = 0, dtype: torch.dtype = torch.float64) -> SmallNet:
    torch.manual_seed(seed)
    net = SmallNet().to(dtype)
    with torch.no_grad():  # spread the weights so that centring/clamping and both signs matter
        net.bin_conv.conv.weight.mul_(4.0)
        net.bin_fc.linear.weight.mul_(20.0)
    return net


def make_batch(seed: int = 1, dtype: torch.dtype = torch.float64):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 1, 8, 8, generator=generator, dtype=dtype)
    y = torch.randint(0, 3, (6,), generator=generator)
    return x, y


def target_weights(net: SmallNet) -> List[nn.Parameter]:
    return [net.bin_conv.conv.weight, net.bin_fc.linear.weight]


def snapshot(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


# --- eq. (8), (1), (3): binarization ---------------------------------------------------------


def test_eq8_eq3_binarization_gives_alpha_times_sign_of_centered_clamped_weights() -> None:
    """After binarization() each BinConv2d weight is alpha * sign of center_and_clamp(original):
    two magnitudes +-alpha per filter, never 0, also where the centred weight is exactly 0."""
    net = make_net()
    with torch.no_grad():
        # Filter 0, position (0, 0): identical values over dim 1 -> centred exactly to 0.
        net.bin_conv.conv.weight[0, :, 0, 0] = 0.5
        # Row 1: zero mean exactly, with two exact zeros that stay 0 after centring.
        row = torch.tensor([0.5, -0.5], dtype=torch.float64).repeat(64)
        row[0] = row[1] = 0.0
        net.bin_fc.linear.weight[1, :] = row
    originals = [w.detach().clone() for w in target_weights(net)]
    bin_op = BinOp(net)
    bin_op.binarization()
    for original, weight in zip(originals, target_weights(net)):
        real = center_and_clamp(original)
        flat_real = real.reshape(real.shape[0], -1)
        flat_bin = weight.detach().reshape(weight.shape[0], -1)
        for o in range(flat_real.shape[0]):
            alpha = flat_real[o].abs().sum().item() / flat_real.shape[1]
            magnitudes = flat_bin[o].abs().unique()
            assert magnitudes.numel() == 1
            assert abs(magnitudes.item() - alpha) <= 1e-14
            expected_sign = torch.where(flat_real[o] >= 0, 1.0, -1.0).double()
            assert torch.equal(torch.sign(flat_bin[o]), expected_sign)
    assert center_and_clamp(originals[0])[0, :, 0, 0].eq(0).all()
    assert (net.bin_conv.conv.weight[0, :, 0, 0] > 0).all()
    assert center_and_clamp(originals[1])[1, :2].eq(0).all()
    assert (net.bin_fc.linear.weight[1, :2] > 0).all()
    assert (net.bin_fc.linear.weight != 0).all() and (net.bin_conv.conv.weight != 0).all()


# --- restore -----------------------------------------------------------------------------------


def test_restore_is_bit_exact_and_idempotent_and_double_binarization_raises() -> None:
    """restore() puts back exactly the saved centred-clamped weights (eq. 8); twice is harmless;
    binarization() twice without restore() raises and keeps the real weights recoverable."""
    net = make_net()
    params_before = target_weights(net)
    reals = [center_and_clamp(w.detach().clone()) for w in params_before]
    bin_op = BinOp(net)
    bin_op.binarization()
    assert bin_op.is_binarized
    for weight, real, saved in zip(target_weights(net), reals, bin_op.saved_params):
        assert torch.equal(saved, real)
        assert not torch.equal(weight, real)
    with pytest.raises(RuntimeError):
        bin_op.binarization()
    bin_op.restore()
    assert not bin_op.is_binarized
    for weight, param, real in zip(target_weights(net), params_before, reals):
        assert weight is param  # the same Parameter object: the optimizer still holds it
        assert torch.equal(weight, real)
    bin_op.restore()
    for weight, real in zip(target_weights(net), reals):
        assert torch.equal(weight, real)
    # A second cycle restores what it saved, bit-exactly.
    second = [center_and_clamp(w.detach().clone()) for w in target_weights(net)]
    with bin_op.binarized():
        pass
    for weight, real in zip(target_weights(net), second):
        assert torch.equal(weight, real)


# --- selection by type ------------------------------------------------------------------------


def test_only_binconv2d_weights_are_targets_and_other_layers_stay_bit_identical() -> None:
    """BinOp.target_modules is exactly the two BinConv2d weights (by identity); the plain first/last
    layers and the FloatConv2d block are bit-identical after binarization and a training step."""
    net = make_net()
    bin_op = BinOp(net, grad_scale=1.0)
    assert bin_op.num_of_params == 2
    assert bin_op.target_modules[0] is net.bin_conv.conv.weight
    assert bin_op.target_modules[1] is net.bin_fc.linear.weight
    untouched = {"first": net.first, "float_block": net.float_block, "last": net.last}
    before = {name: snapshot(module) for name, module in untouched.items()}
    bin_before = [w.detach().clone() for w in target_weights(net)]
    x, y = make_batch()
    with bin_op.binarized():
        for name, module in untouched.items():
            for key, value in module.state_dict().items():
                assert torch.equal(value, before[name][key]), f"{name}.{key} changed by binarization"
        for weight, old in zip(target_weights(net), bin_before):
            assert not torch.equal(weight, old)
        F.cross_entropy(net(x), y).backward()
    for name, module in untouched.items():
        for key, value in module.named_parameters():
            assert torch.equal(value, before[name][key]), f"{name}.{key} changed"


def test_selection_is_by_type_not_position() -> None:
    """A BinConv2d placed first is still selected, and is the only target; FloatConv2d never is."""
    torch.manual_seed(0)
    net = nn.Sequential(
        BinConv2d(3, 4, kernel_size=3, stride=1, padding=1),
        nn.Conv2d(4, 4, kernel_size=3),
        FloatConv2d(4, 4, kernel_size=3, stride=1, padding=1),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 2),
    )
    bin_op = BinOp(net)
    assert len(bin_op.target_modules) == 1
    assert bin_op.target_modules[0] is net[0].conv.weight
    others = [p for name, p in net.named_parameters() if not name.startswith("0.")]
    assert all(all(p is not t for t in bin_op.target_modules) for p in others)


# --- eq. (7): corrected gradient ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (12, 3, 3, 3), (6, 1, 5, 5), (10, 20), (3, 200)])
def test_eq7_corrected_gradient_matches_autograd_of_alpha_times_sign_ste(shape) -> None:
    """Eq. (7) equals autograd of alpha(W) * sign_STE(W) (STE of eq. 4), to float64 precision,
    with weights outside [-1, 1] (indicator 0) and exactly at +-1 (indicator 1)."""
    generator = torch.Generator().manual_seed(sum(shape))
    weight = 0.9 * torch.randn(*shape, generator=generator, dtype=torch.float64)
    weight.view(-1)[0] = 1.0
    weight.view(-1)[1] = -1.0
    grad_binary = torch.randn(*shape, generator=generator, dtype=torch.float64)
    assert (weight.abs() > 1).any() and (weight.abs() < 1).any()
    expected = reference_grad(weight, grad_binary)
    torch.testing.assert_close(scaled_sign_grad(weight, grad_binary), expected, rtol=0, atol=1e-12)


def test_eq7_corrected_gradient_by_hand_with_a_zero_weight() -> None:
    """Eq. (7) term by term with loops; at W_i = 0 the alpha path uses sign(0) = +1 (notes, sec. 3)."""
    weight = torch.tensor([[0.0, -0.5, 0.25, 1.5], [-2.0, 0.75, -0.125, 1.0]], dtype=torch.float64)
    grad_binary = torch.tensor([[0.3, -1.1, 0.7, 2.0], [0.4, 0.9, -0.6, -1.3]], dtype=torch.float64)
    result = scaled_sign_grad(weight, grad_binary)
    n = weight.shape[1]
    for o in range(weight.shape[0]):
        w = weight[o].tolist()
        g = grad_binary[o].tolist()
        sign = [1.0 if v >= 0 else -1.0 for v in w]
        alpha = sum(abs(v) for v in w) / n
        shared = sum(g[j] * sign[j] for j in range(n)) / n
        for i in range(n):
            expected = sign[i] * shared + g[i] * alpha * (1.0 if abs(w[i]) <= 1 else 0.0)
            assert abs(result[o, i].item() - expected) <= 1e-14, (o, i)


def test_eq9_legacy_factor_values_by_hand() -> None:
    """Eq. (9): s = n (1 - 1/C_in): LeNet bin_conv2 (50,20,5,5) -> 500 * 0.95 = 475,
    bin_ip1 (500, 800) -> 799, a grouped conv (12, 3, 3, 3) -> 27 * 2/3 = 18."""
    assert legacy_grad_factor(torch.empty(50, 20, 5, 5)) == pytest.approx(475.0, rel=1e-15)
    assert legacy_grad_factor(torch.empty(500, 800)) == pytest.approx(799.0, rel=1e-15)
    assert legacy_grad_factor(torch.empty(12, 3, 3, 3)) == pytest.approx(18.0, rel=1e-15)


@pytest.mark.parametrize("grad_scale, grad_multiplier", [("2017", 1.0), (1.0, 1.0), (1e9, 1.0), ("2017", 1e9)])
def test_eq7_eq9_eq11_update_binary_grad_weight_end_to_end(grad_scale, grad_multiplier) -> None:
    """updateBinaryGradWeight() replaces the grad of each restored weight by eq. (7) times the factor:
    eq. (9) for "2017" (475 for a (50,20,5,5) weight), 1 (pure formula), a constant 1e9, and the
    2017 ImageNet code's 1e9 on top of eq. (9) (eq. 11)."""
    torch.manual_seed(3)
    net = nn.Sequential(
        BinConv2d(20, 50, kernel_size=5, stride=1, padding=0),
        BinConv2d(50 * 4, 10, Linear=True, previous_conv=True, size=4),
    ).double()
    weights = [net[0].conv.weight, net[1].linear.weight]
    bin_op = BinOp(net, grad_scale=grad_scale, grad_multiplier=grad_multiplier)
    generator = torch.Generator().manual_seed(4)
    known = [torch.randn(w.shape, generator=generator, dtype=torch.float64) for w in weights]
    bin_op.binarization()
    for weight, grad in zip(weights, known):
        weight.grad = grad.clone()
    with pytest.raises(RuntimeError):
        bin_op.updateBinaryGradWeight()  # needs restore() first
    bin_op.restore()
    reals = [w.detach().clone() for w in weights]
    bin_op.updateBinaryGradWeight()
    factors = [f * grad_multiplier for f in {"2017": [475.0, 199.0], 1.0: [1.0, 1.0], 1e9: [1e9, 1e9]}[grad_scale]]
    for weight, real, grad, factor in zip(weights, reals, known, factors):
        assert torch.equal(weight, real)  # the update touches only the gradient
        expected = reference_grad(real, grad) * factor
        torch.testing.assert_close(weight.grad, expected, rtol=1e-13, atol=1e-12 * factor)


def test_update_binary_grad_weight_skips_weights_without_grad_and_rejects_bad_scale() -> None:
    net = make_net()
    bin_op = BinOp(net)
    bin_op.updateBinaryGradWeight()  # no gradients yet: nothing to do, no error
    assert all(w.grad is None for w in target_weights(net))
    with pytest.raises(ValueError):
        BinOp(net, grad_scale="2016")


# --- a full training step -----------------------------------------------------------------------


@pytest.mark.parametrize("grad_scale", ["2017", 1.0])
def test_eq7_full_training_step_through_context_manager(grad_scale) -> None:
    """with binarized(): forward + backward; then updateBinaryGradWeight() and an SGD step.
    The gradient used equals autograd of the loss through alpha(W) * sign_STE(W) (eq. 7) times the
    factor; afterwards the weights are real-valued (not two magnitudes per filter) and changed."""
    net = make_net()
    x, y = make_batch()
    lr = 0.05
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    bin_op = BinOp(net, grad_scale=grad_scale)
    names = ["bin_conv.conv.weight", "bin_fc.linear.weight"]
    reals = [center_and_clamp(w.detach().clone()) for w in target_weights(net)]

    # Reference: the same forward with W~ = alpha(W) * sign_STE(W) built from the real weights.
    reference_net = make_net()
    leaves = [real.clone().requires_grad_(True) for real in reals]
    overrides = {name: surrogate_weight(leaf) for name, leaf in zip(names, leaves)}
    reference_loss = F.cross_entropy(functional_call(reference_net, overrides, (x,)), y)
    reference_grads = torch.autograd.grad(reference_loss, leaves)

    optimizer.zero_grad()
    with bin_op.binarized():
        loss = F.cross_entropy(net(x), y)
        loss.backward()
    bin_op.updateBinaryGradWeight()
    torch.testing.assert_close(loss.detach(), reference_loss.detach(), rtol=0, atol=1e-12)
    for weight, real, ref in zip(target_weights(net), reals, reference_grads):
        factor = legacy_grad_factor(weight) if grad_scale == "2017" else 1.0
        assert torch.equal(weight, real)
        assert ref.abs().max() > 0
        torch.testing.assert_close(weight.grad, ref * factor, rtol=1e-12, atol=1e-12 * factor)
    optimizer.step()
    for weight, real in zip(target_weights(net), reals):
        assert not torch.equal(weight, real)
        torch.testing.assert_close(weight.detach(), real - lr * weight.grad, rtol=0, atol=1e-12)
        flat = weight.detach().reshape(weight.shape[0], -1)
        assert all(row.abs().unique().numel() > 2 for row in flat)  # real, not alpha * sign


# --- restore on errors ---------------------------------------------------------------------------


class Boom(Exception):
    pass


class RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        raise Boom("in backward")


def _assert_real_weights_back(net: SmallNet, bin_op: BinOp, reals: List[torch.Tensor]) -> None:
    assert not bin_op.is_binarized
    for weight, real in zip(target_weights(net), reals):
        assert torch.equal(weight, real)


def test_exception_in_forward_propagates_and_restores_real_weights() -> None:
    net = make_net()
    reals = [center_and_clamp(w.detach().clone()) for w in target_weights(net)]
    bin_op = BinOp(net)

    def explode(module, inputs, output):
        raise Boom("in forward")

    handle = net.bin_fc.register_forward_hook(explode)
    x, _ = make_batch()
    with pytest.raises(Boom):
        with bin_op.binarized():
            net(x)
    handle.remove()
    _assert_real_weights_back(net, bin_op, reals)
    with bin_op.binarized():  # usable again afterwards
        net(x)
    assert not bin_op.is_binarized


def test_exception_in_backward_propagates_and_restores_real_weights() -> None:
    net = make_net()
    reals = [center_and_clamp(w.detach().clone()) for w in target_weights(net)]
    bin_op = BinOp(net)
    x, y = make_batch()
    with pytest.raises(Boom):
        with bin_op.binarized():
            loss = F.cross_entropy(RaiseInBackward.apply(net(x)), y)
            loss.backward()
    _assert_real_weights_back(net, bin_op, reals)
