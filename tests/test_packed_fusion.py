"""Fusion in the packed engine: bits passed block to block, layers folded into thresholds.

Bit-domain fusion must not change a single output bit: the fused model's outputs
equal the unfused packed model's exactly (float BatchNorm folding aside, which is
tested to float rounding).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from xnornet import BinConv2d
from xnornet.packed import PackedBinConv2d, pack_model
from xnornet.packed.engine import PackedActivations, PackedMaxPool2d, plan_fusion
from xnornet.packed.pack import integer_limits

from test_packed_kernels import randomize_batchnorm
from test_packed_network import network


def chain_model(seed: int) -> nn.Module:
    """Every fusion: folded BN + ReLU before a block, conv -> conv, conv -> max pool -> conv with padding,
    channel counts that are not multiples of 64, and a float-output block last."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8, affine=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
        BinConv2d(8, 70, kernel_size=3, stride=1, padding=1),
        BinConv2d(70, 130, kernel_size=1, stride=1, padding=0),
        nn.MaxPool2d(3, 2, 1),
        BinConv2d(130, 20, kernel_size=3, stride=1, padding=1),
        nn.AdaptiveAvgPool2d(1),
    ).eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    return model


@pytest.mark.parametrize("batch", [1, 3])
def test_fused_chain_gives_exactly_the_unfused_outputs(batch: int) -> None:
    model = chain_model(seed=batch)
    fused, unfused = pack_model(model), pack_model(model, fuse=False)
    plan = fused.fusion_plan
    assert plan.folded == {"4": ["1", "2"]}
    assert plan.bit_outputs == {"4": ["5", 0], "5": ["7", 0]} and plan.bit_pools == {"6": 1}
    assert isinstance(fused[1], nn.Identity) and isinstance(fused[6], PackedMaxPool2d)
    assert fused[5].bit_input and fused[5].output_padding == 0 and not hasattr(fused[5], "alpha")
    x = torch.randn(batch, 3, 14, 14, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        bits = fused[:7](x)  # through the OR max pool, with the padding ring of block 7
        assert isinstance(bits, PackedActivations) and bits.shape == (batch, 130, 3, 3) and bits.padding == 1
        assert torch.equal(fused(x), unfused(x))


def test_fused_networks_match_unfused_to_float_rounding() -> None:
    """NIN: bits between blocks, BN + ReLU folded, and the last BatchNorm folded into the float conv."""
    model = network("nin", {}, seed=3)
    fused, unfused = pack_model(model), pack_model(model, fuse=False)
    plan = fused.fusion_plan
    assert plan.folded == {"xnor.3": ["xnor.1", "xnor.2"]} and plan.float_folds == {"xnor.12": "xnor.13"}
    assert set(plan.bit_outputs) == {"xnor.3", "xnor.4", "xnor.6", "xnor.7", "xnor.10"}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = fused(x), unfused(x)
    assert torch.equal(a.argmax(1), b.argmax(1))
    assert ((a - b).abs().max() / b.abs().max()) <= 1e-5


def test_plan_only_fuses_what_is_exact() -> None:
    torch.manual_seed(0)
    negative_bn = nn.BatchNorm2d(8)
    with torch.no_grad():
        negative_bn.weight.fill_(-1.0)  # decreasing: cannot be folded into a threshold
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), negative_bn, nn.ReLU(),
        BinConv2d(8, 16, kernel_size=3, stride=1, padding=0, groups=2),  # grouped: no bit output ...
        BinConv2d(16, 16, kernel_size=1, stride=1, padding=0),
        nn.AvgPool2d(2),  # ... and no bits through an average pool
        BinConv2d(16, 16, kernel_size=1, stride=1, padding=0),
        BinConv2d(16, 16, kernel_size=1, stride=1, padding=0, activation_scale=True),  # K needs the float input
    ).eval()
    plan = plan_fusion(pack_model(model, fuse=False))
    assert plan.folded == {"3": ["2"]} and plan.bit_outputs == {} and plan.bit_pools == {}
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(pack_model(model)(x), pack_model(model, fuse=False)(x))


def test_integer_limits_equal_a_brute_force_search() -> None:
    generator = np.random.default_rng(0)
    reduction = 75
    alpha = generator.uniform(0.0, 0.2, 40).astype(np.float32)
    alpha[0] = 0.0  # a constant output: always or never +1
    bias = generator.normal(0.0, 2.0, 40).astype(np.float32)
    threshold = generator.normal(0.5, 2.0, 40).astype(np.float32)
    threshold[1], threshold[2] = -np.inf, np.inf
    limits = integer_limits(alpha, bias, threshold, reduction)
    dots = np.arange(-reduction, reduction + 1)
    for o in range(40):
        value = np.maximum(alpha[o] * dots.astype(np.float32) + bias[o], np.float32(0.0))
        np.testing.assert_array_equal(dots >= limits[o], value >= threshold[o], err_msg=f"channel {o}")
    assert limits[1] == -reduction and limits[2] == reduction + 1


def test_linear_blocks_pass_bits_to_linear_blocks() -> None:
    model = network("alexnet", {"input_size": 67, "hidden_features": 96, "num_classes": 12}, seed=2)
    fused = pack_model(model)
    assert fused.fusion_plan.bit_outputs["classifier.0"] == ["classifier.1", 0]
    blocks = [m for m in fused.modules() if isinstance(m, PackedBinConv2d)]
    assert len(blocks) == sum(isinstance(m, BinConv2d) for m in model.modules())
    x = torch.randn(3, 3, 67, 67, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = fused(x), pack_model(model, fuse=False)(x)
    assert torch.equal(a.argmax(1), b.argmax(1)) and ((a - b).abs().max() / b.abs().max()) <= 1e-5
