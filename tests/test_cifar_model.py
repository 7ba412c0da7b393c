"""CIFAR-10 NIN: the 2017 layer layout and state_dict keys, the 2017 init, BinOp selection."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "CIFAR_10"))

from nin import ARCHITECTURES, INIT_STD, NIN, build_model  # noqa: E402
from xnornet import BinConv2d, BinOp, FloatConv2d  # noqa: E402

BLOCKS = {  # index: (in, out, kernel, padding, dropout)
    3: (192, 160, 1, 0, 0), 4: (160, 96, 1, 0, 0), 6: (96, 192, 5, 2, 0.5), 7: (192, 192, 1, 0, 0),
    8: (192, 192, 1, 0, 0), 10: (192, 192, 3, 1, 0.5), 11: (192, 192, 1, 0, 0),
}


def expected_keys() -> set:
    keys = {"xnor.0.weight", "xnor.0.bias", "xnor.13.weight", "xnor.13.bias"}
    for index in (1, 12):
        keys |= {f"xnor.{index}.{name}" for name in ("running_mean", "running_var", "num_batches_tracked")}
    for index in BLOCKS:
        keys |= {f"xnor.{index}.bn.{name}" for name in
                 ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
        keys |= {f"xnor.{index}.conv.weight", f"xnor.{index}.conv.bias"}
    return keys


@pytest.mark.parametrize("arch", ["nin", "nin_float"])
def test_state_dict_keys_are_the_2017_ones(arch):
    state = build_model(arch).state_dict()
    assert set(state) == expected_keys()
    assert state["xnor.0.weight"].shape == (192, 3, 5, 5)
    assert state["xnor.6.conv.weight"].shape == (192, 96, 5, 5)
    assert state["xnor.13.weight"].shape == (10, 192, 1, 1)


def test_layer_layout():
    layers = NIN().xnor
    assert len(layers) == 16
    first, last = layers[0], layers[13]
    assert (type(first), first.in_channels, first.out_channels, first.kernel_size, first.padding) == \
        (nn.Conv2d, 3, 192, (5, 5), (2, 2))
    assert (type(last), last.in_channels, last.out_channels, last.kernel_size) == (nn.Conv2d, 192, 10, (1, 1))
    for index in (1, 12):
        bn = layers[index]
        assert isinstance(bn, nn.BatchNorm2d) and not bn.affine
        assert (bn.num_features, bn.eps, bn.momentum) == (192, 1e-4, 0.1)
    assert isinstance(layers[2], nn.ReLU) and isinstance(layers[14], nn.ReLU)
    pools = {5: nn.MaxPool2d, 9: nn.AvgPool2d}
    for index, kind in pools.items():
        assert isinstance(layers[index], kind)
        assert (layers[index].kernel_size, layers[index].stride, layers[index].padding) == (3, 2, 1)
    assert isinstance(layers[15], nn.AvgPool2d) and layers[15].kernel_size == 8 and layers[15].stride == 1
    for index, (c_in, c_out, kernel, padding, dropout) in BLOCKS.items():
        block = layers[index]
        assert isinstance(block, BinConv2d)
        conv = block.conv
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == \
            (c_in, c_out, (kernel, kernel), (1, 1), (padding, padding))
        assert block.dropout_ratio == dropout
        assert hasattr(block, "dropout") == (dropout != 0)
        if dropout:
            assert block.dropout.p == dropout
        assert block.bn.affine and block.bn.eps == 1e-4


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_forward_gives_one_score_per_class(arch):
    torch.manual_seed(0)
    model = build_model(arch)
    model.eval()
    with BinOp(model).binarized():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_2017_init_by_module_type():
    torch.manual_seed(0)
    model = NIN()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 9  # first, last and the seven blocks' convolutions
    big = model.xnor[6].conv.weight  # 460,800 values: the sample std is tight
    assert abs(big.std().item() - INIT_STD) < 1e-3 and abs(big.mean().item()) < 1e-3
    for conv in convs:
        assert abs(conv.weight.std().item() - INIT_STD) < 0.01, conv
        assert torch.count_nonzero(conv.bias) == 0


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_affine_batchnorm_scale_is_clamped_to_0_01_as_in_2017(arch):
    """The 2017 NIN clamps every affine BatchNorm scale (those of its blocks) to >= 0.01 in its forward pass."""
    model = build_model(arch)
    affine = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.affine]
    blocks = [model.xnor[i] for i in BLOCKS]
    assert len(affine) == len(blocks) == 7 and all(block.bn_scale_floor == 0.01 for block in blocks)
    with torch.no_grad():
        for bn in affine:
            bn.weight[:2] = torch.tensor([-0.5, 0.001])
    model.eval()(torch.randn(1, 3, 32, 32))
    assert all(bn.weight[0].item() == bn.weight[1].item() == pytest.approx(0.01) for bn in affine)


def test_binop_selects_the_blocks_by_type():
    assert BinOp(build_model("nin")).num_of_params == 7
    assert BinOp(build_model("nin_float")).num_of_params == 0
    float_model = build_model("nin_float")
    assert all(isinstance(float_model.xnor[i], FloatConv2d) for i in BLOCKS)
