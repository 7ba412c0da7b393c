"""xnornet.summary: per-layer shapes, MACs and memory of LeNet-5 and NIN, checked by hand."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from conftest import REPO_ROOT, assert_one_line_error, run_script

sys.path.insert(0, str(REPO_ROOT / "MNIST"))
sys.path.insert(0, str(REPO_ROOT / "CIFAR_10"))
from lenet import ARCHITECTURES, INPUT_SHAPE  # noqa: E402
from nin import ARCHITECTURES as NIN_ARCHITECTURES  # noqa: E402
from nin import INPUT_SHAPE as NIN_INPUT_SHAPE  # noqa: E402

from xnornet.summary import model_summary  # noqa: E402

# LeNet-5 on 1x28x28: conv1 5x5 -> 20x24x24, pool -> 12x12, bin_conv2 5x5 -> 50x8x8, pool -> 4x4,
# bin_ip1 800 -> 500, ip2 500 -> 10.
CONV1_MACS = 20 * 1 * 25 * 24 * 24
BIN_CONV2_MACS = 50 * 20 * 25 * 8 * 8
BIN_IP1_MACS = 800 * 500
IP2_MACS = 500 * 10


def rows_by_name(summary):
    return {row.name: row for row in summary.rows}


def inference_values(model: torch.nn.Module) -> int:
    return sum(v.numel() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked"))


def test_lenet_macs_counted_by_hand():
    summary = model_summary(ARCHITECTURES["LeNet_5"](), INPUT_SHAPE)
    rows = rows_by_name(summary)
    assert list(rows) == ["conv1", "bn_conv1", "relu_conv1", "pool1", "bin_conv2", "pool2", "bin_ip1", "ip2"]
    conv2 = rows["bin_conv2"]
    assert conv2.output_shape == (50, 8, 8)
    assert conv2.binarized and conv2.bits_per_weight == 1
    assert conv2.binary_macs == BIN_CONV2_MACS == 1_600_000
    assert conv2.float_macs == 0
    assert rows["bin_ip1"].binary_macs == BIN_IP1_MACS
    assert rows["conv1"].float_macs == CONV1_MACS and rows["conv1"].binary_macs == 0
    assert rows["ip2"].float_macs == IP2_MACS and not rows["ip2"].binarized
    assert rows["ip2"].bits_per_weight == 32 and rows["pool1"].bits_per_weight is None
    assert rows["pool1"].output_shape == (20, 12, 12) and rows["ip2"].output_shape == (10,)
    assert summary.binary_macs == BIN_CONV2_MACS + BIN_IP1_MACS
    assert summary.float_macs == CONV1_MACS + IP2_MACS
    assert summary.binary_mac_share == pytest.approx(2_000_000 / 2_293_000)


def test_lenet_memory_and_totals_add_up():
    model = ARCHITECTURES["LeNet_5"]()
    summary = model_summary(model, INPUT_SHAPE)
    rows = rows_by_name(summary)
    assert summary.params == inference_values(model) == sum(row.params for row in summary.rows)
    assert summary.binary_macs == sum(row.binary_macs for row in summary.rows)
    assert summary.float_macs == sum(row.float_macs for row in summary.rows)
    assert summary.float32_bytes == 4 * summary.params
    # bin_conv2: 25,000 weights at 1 bit, 50 alphas + 50 biases + BN (20 x scale, shift, mean, var) at 32 bits.
    assert rows["bin_conv2"].params == 25_000 + 50 + 80
    assert rows["bin_conv2"].packed_bytes == 25_000 // 8 + 4 * (50 + 50 + 80)
    packed = (summary.float32_bytes - 4 * (25_000 + 400_000) + (25_000 + 400_000) // 8 + 4 * (50 + 500))
    assert summary.packed_bytes == packed
    assert summary.packed_bytes == sum(row.packed_bytes for row in summary.rows)
    table = summary.table()
    assert "bin_conv2" in table and "1,600,000" in table and "87.2% binary" in table


def test_float_and_bwn_variants():
    floating = model_summary(ARCHITECTURES["LeNet_5_float"](), INPUT_SHAPE)
    assert floating.binary_macs == 0 and floating.float_macs == CONV1_MACS + BIN_CONV2_MACS + BIN_IP1_MACS + IP2_MACS
    assert not any(row.binarized for row in floating.rows)
    assert floating.packed_bytes == floating.float32_bytes
    # Binary weights with real inputs: the weights pack, the MACs stay float.
    bwn = model_summary(ARCHITECTURES["LeNet_5_bwn"](), INPUT_SHAPE)
    assert rows_by_name(bwn)["bin_conv2"].binarized and bwn.binary_macs == 0
    assert bwn.packed_bytes == model_summary(ARCHITECTURES["LeNet_5"](), INPUT_SHAPE).packed_bytes


def test_summary_leaves_the_model_as_it_was():
    model = ARCHITECTURES["LeNet_5"]()
    with torch.no_grad():
        model.bin_conv2.bn.weight[0] = 0.001  # a block's forward would clamp this to 0.01
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model_summary(model, INPUT_SHAPE)
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nin_summary():
    summary = model_summary(NIN_ARCHITECTURES["nin"](), NIN_INPUT_SHAPE)
    binarized = [row for row in summary.rows if row.binarized]
    assert [row.name for row in binarized] == [f"xnor.{i}" for i in (3, 4, 6, 7, 8, 10, 11)]
    rows = rows_by_name(summary)
    assert rows["xnor.0"].float_macs == 192 * 3 * 25 * 32 * 32
    # xnor.6: 96 -> 192 channels, 5x5, on the 16x16 map after the first pooling.
    assert rows["xnor.6"].output_shape == (192, 16, 16)
    assert rows["xnor.6"].binary_macs == 192 * 96 * 25 * 16 * 16
    assert rows["xnor.15"].output_shape == (10, 1, 1)
    assert 0.8 < summary.binary_mac_share < 1


def test_wrong_input_shape_is_a_user_error():
    from xnornet.cli import UserError

    with pytest.raises(UserError, match="input of shape"):
        model_summary(ARCHITECTURES["LeNet_5"](), (1, 20, 20))


def test_model_file_prints_the_summary():
    result = run_script("MNIST/lenet.py", ["--arch", "LeNet_5_float"], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "LeNet_5_float, one 1x28x28 input" in result.stdout
    assert "bin_conv2" in result.stdout and "(0.0% binary)" in result.stdout
    bad = run_script("MNIST/lenet.py", ["--arch", "LeNet_6"], timeout=120)
    assert_one_line_error(bad, "--arch")
    wrong = run_script("MNIST/lenet.py", ["--input-shape", "1", "8", "8"], timeout=120)
    assert_one_line_error(wrong, "input of shape (1, 8, 8)")


def test_packed_memory_rounds_up_to_whole_bytes():
    # One 5x5 filter on 5 channels: 125 weights = 125 bits -> 16 bytes; a bare block is one row.
    from xnornet import BinConv2d

    block = BinConv2d(5, 1, kernel_size=5, stride=1, padding=0)
    summary = model_summary(block, (5, 5, 5))
    (row,) = summary.rows
    assert row.binary_macs == 125
    assert row.packed_bytes == math.ceil(125 / 8) + 4 * (1 + 1 + 4 * 5)
