"""ImageNet recipe: the 2017 AlexNet (keys, shapes, init, no BatchNorm clamp), its two 2017 runs'
defaults (--recipe) and its flags. In-process, CPU."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
import torch.nn as nn

from imagenet_fixtures import recipe_main  # also puts ImageNet/ on sys.path

from alexnet import build_model, feature_map_size, smallest_input_size  # noqa: E402  (recipe-local)
from alexnet import INIT_SCALE_CAFFE_RUN, INIT_SCALE_FINAL  # noqa: E402
from xnornet import BinConv2d, BinOp, FloatConv2d
from xnornet.cli import UserError
from xnornet.engine import lr_at_epoch

FEATURE_KEYS_2017 = [
    "features.0.weight", "features.0.bias",
    "features.1.weight", "features.1.bias", "features.1.running_mean", "features.1.running_var",
    "features.1.num_batches_tracked",
]
BIN_BLOCKS_2017 = ["features.4", "features.6", "features.7", "features.8", "classifier.0", "classifier.1"]


@pytest.fixture(scope="module")
def alexnet_2017() -> nn.Module:
    torch.manual_seed(0)
    return build_model("alexnet")


def expected_keys_2017() -> list:
    keys = list(FEATURE_KEYS_2017)
    bn_keys = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    for block in BIN_BLOCKS_2017:
        weight_layer = "linear" if block.startswith("classifier") else "conv"
        keys += [f"{block}.bn.{key}" for key in bn_keys]
        keys += [f"{block}.{weight_layer}.weight", f"{block}.{weight_layer}.bias"]
    keys += [f"classifier.2.{key}" for key in bn_keys]
    keys += ["classifier.4.weight", "classifier.4.bias"]
    return keys


def test_state_dict_keys_and_shapes_match_2017(alexnet_2017: nn.Module) -> None:
    state = alexnet_2017.state_dict()
    assert sorted(state) == sorted(expected_keys_2017())
    shapes = {
        "features.0.weight": (96, 3, 11, 11),
        "features.4.conv.weight": (256, 96, 5, 5),
        "features.6.conv.weight": (384, 256, 3, 3),
        "features.7.conv.weight": (384, 384, 3, 3),
        "features.8.conv.weight": (256, 384, 3, 3),
        "classifier.0.bn.weight": (9216,),  # BatchNorm1d after the flatten: one per feature, as the 2017 files
        "classifier.0.bn.running_mean": (9216,),
        "classifier.0.bn.running_var": (9216,),
        "classifier.0.bn.bias": (9216,),
        "classifier.0.linear.weight": (4096, 9216),
        "classifier.1.linear.weight": (4096, 4096),
        "classifier.2.weight": (4096,),
        "classifier.4.weight": (1000, 4096),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key


def test_layers_and_hyperparameters_match_2017(alexnet_2017: nn.Module) -> None:
    features, classifier = alexnet_2017.features, alexnet_2017.classifier
    conv0 = features[0]
    assert (conv0.stride, conv0.padding) == ((4, 4), (0, 0))
    assert isinstance(features[1], nn.BatchNorm2d) and features[1].eps == 1e-4 and features[1].affine
    assert [type(features[i]) for i in (3, 5, 9)] == [nn.MaxPool2d] * 3
    assert all(features[i].kernel_size == 3 and features[i].stride == 2 for i in (3, 5, 9))
    assert features[4].conv.padding == (2, 2) and features[6].conv.padding == (1, 1)
    assert classifier[0].Linear and not classifier[0].previous_conv
    assert isinstance(classifier[0].bn, nn.BatchNorm1d) and classifier[0].bn.num_features == 9216
    assert classifier[0].bn.eps == 1e-4 and classifier[1].bn.eps == 1e-4
    assert classifier[1].dropout_ratio == 0.5
    assert isinstance(classifier[2], nn.BatchNorm1d) and classifier[2].eps == 1e-3
    assert isinstance(classifier[3], nn.Dropout) and classifier[3].p == 0.5
    assert type(classifier[4]) is nn.Linear


def test_227_input_gives_the_6x6_map(alexnet_2017: nn.Module) -> None:
    assert feature_map_size(227) == 6
    alexnet_2017.eval()
    with torch.no_grad():
        assert alexnet_2017.features(torch.randn(1, 3, 227, 227)).shape == (1, 256, 6, 6)


def test_forward_flattens_the_map_channel_major_before_classifier_0() -> None:
    """As the 2017 ``x.view(N, 256 * 6 * 6)``: classifier.0 gets the 256xSxS map flattened, feature
    c * S * S + y * S + x being channel c at (y, x), whatever the memory format."""
    torch.manual_seed(3)
    model = build_model("alexnet_float", num_classes=4, input_size=99, hidden_features=8).eval()  # 2x2 map
    seen = []
    model.classifier[0].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    x = torch.randn(3, 3, 99, 99)
    with torch.no_grad():
        maps = model.features(x)
        for memory_format in (torch.contiguous_format, torch.channels_last):
            out = model.to(memory_format=memory_format)(x.contiguous(memory_format=memory_format))
            assert out.shape == (3, 4)
    assert len(seen) == 2 and (maps != 0).float().mean() > 0.3  # a map worth comparing
    for flat in seen:  # (the channels-last pass may round its convolutions differently)
        assert flat.shape == (3, 256 * 2 * 2)
        assert torch.allclose(flat[:, 5 * 4 + 1 * 2 + 0], maps[:, 5, 1, 0], rtol=1e-4, atol=1e-6)
        assert torch.allclose(flat, maps.reshape(3, -1), rtol=1e-4, atol=1e-6)
    assert torch.equal(seen[0], maps.reshape(3, -1))


def test_batchnorm_scales_are_not_clamped_as_in_2017() -> None:
    """The 2017 AlexNet has no BatchNorm scale clamp (LeNet-5 and NIN have one): a negative
    scale stays negative through training and evaluation passes."""
    model = build_model("alexnet", num_classes=3, input_size=67, hidden_features=8)
    blocks = [m for m in model.modules() if isinstance(m, BinConv2d)]
    assert len(blocks) == 6 and all(block.bn_scale_floor is None for block in blocks)
    with torch.no_grad():
        for block in blocks:
            block.bn.weight[0] = -0.5
    model.train()
    with BinOp(model).binarized():
        model(torch.randn(4, 3, 67, 67))
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 67, 67))
    assert all(block.bn.weight[0].item() == -0.5 for block in blocks)


def test_classifier_input_follows_the_input_size() -> None:
    assert smallest_input_size() == 67 and feature_map_size(66) < 1
    small = build_model("alexnet", num_classes=3, input_size=99, hidden_features=16)  # 99 -> 2x2 map
    assert small.classifier[0].linear.weight.shape == (16, 256 * 2 * 2)
    assert small.classifier[0].bn.num_features == 256 * 2 * 2
    assert small(torch.randn(2, 3, 99, 99)).shape == (2, 3)
    with pytest.raises(ValueError, match="too small"):
        build_model("alexnet", input_size=66)


@pytest.mark.parametrize("scale", [INIT_SCALE_CAFFE_RUN, INIT_SCALE_FINAL])
def test_2017_initialisation(scale: float) -> None:
    """Weight ~ N(0, std = scale / c), c = elements per output filter (1: the 2017 Caffe-data
    run, 2: the final 2017 code); BatchNorm2d weight 1, bias 0; BatchNorm1d weight ~ U(0, 1)
    (PyTorch 0.2-0.4's default, which the 2017 code left to the BatchNorm1d layers), bias 0."""
    assert (INIT_SCALE_CAFFE_RUN, INIT_SCALE_FINAL) == (1.0, 2.0)
    torch.manual_seed(0)
    model = build_model("alexnet", init_scale=scale)
    for key, c in (("features.0.weight", 3 * 11 * 11), ("features.4.conv.weight", 96 * 25),
                   ("classifier.0.linear.weight", 9216), ("classifier.1.linear.weight", 4096),
                   ("classifier.4.weight", 4096)):
        weight = model.state_dict()[key]
        assert weight.mean().abs() < 0.1 * scale / c, key
        assert weight.std().item() == pytest.approx(scale / c, rel=0.05), key
    batchnorms_1d = 0
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
        elif isinstance(module, nn.BatchNorm1d):
            batchnorms_1d += 1
            weight = module.weight.detach()
            assert torch.all(module.bias == 0) and weight.min() >= 0 and weight.max() < 1
            assert weight.mean().item() == pytest.approx(0.5, abs=0.05) and weight.std() > 0.2
    assert batchnorms_1d == 3  # classifier.0.bn, classifier.1.bn, classifier.2
    with pytest.raises(ValueError, match="scale"):
        build_model("alexnet", input_size=67, hidden_features=8, init_scale=0.0)


def test_binop_selects_the_six_binary_layers_by_type() -> None:
    xnor = build_model("alexnet", num_classes=5, input_size=67, hidden_features=8)
    float_net = build_model("alexnet_float", num_classes=5, input_size=67, hidden_features=8)
    targets = BinOp(xnor).target_modules
    expected = [xnor.get_submodule(name).weight_layer.weight for name in BIN_BLOCKS_2017]
    assert len(targets) == 6 and all(t is e for t, e in zip(targets, expected))
    assert BinOp(float_net).num_of_params == 0
    assert all(isinstance(float_net.get_submodule(name), FloatConv2d) for name in BIN_BLOCKS_2017)
    assert not any(isinstance(m, BinConv2d) for m in float_net.modules())
    assert xnor.state_dict().keys() == float_net.state_dict().keys()


@pytest.mark.parametrize("lr_epochs, expected", [(25, [26, 51, 76]), (30, [31, 61, 91])])
def test_step_schedules_are_the_2017_ones(lr_epochs: int, expected: list) -> None:
    """2017: lr = base * 0.1 ** (epoch0 // N), epoch0 = epoch - 1; N = 25 (Caffe-data run), 30 (final code)."""
    recipe = recipe_main()
    milestones = recipe.step_milestones(100, lr_epochs)
    assert milestones == expected
    for epoch in range(1, 101):
        assert lr_at_epoch(0.001, epoch, milestones) == pytest.approx(0.001 * 0.1 ** ((epoch - 1) // lr_epochs))


def run_defaults(args: argparse.Namespace) -> tuple:
    return args.recipe, args.init_scale, args.lr_epochs, args.weight_decay, args.shuffle


CAFFE_RUN = ("2017-caffe", 1.0, 25, 1e-5, False)
TORCHVISION_RUN = ("2017-torchvision", 2.0, 30, 3e-6, True)


def test_defaults_are_the_2017_flags_and_the_run_of_each_data_layout() -> None:
    parser = recipe_main().get_args_parser()
    args = parser.parse_args([])
    cpus = len(os.sched_getaffinity(0))
    assert (args.arch, args.epochs, args.batch_size, args.lr, args.workers) == ("alexnet", 100, 256, 0.001,
                                                                                min(8, cpus))
    assert (args.input_size, args.resize, args.caffe_data, args.start_epoch, args.amp) == (227, 256, False, None, None)
    assert run_defaults(args) == TORCHVISION_RUN  # image folders: the final 2017 code's torchvision run
    args = parser.parse_args(["-a", "alexnet_float", "-j", "3", "-b", "64", "-e", "--pretrained", "x.pth",
                              "--start-epoch", "26", "--amp", "--caffe-data", "-p", "7"])
    assert (args.arch, args.workers, args.batch_size, args.evaluate, args.pretrained) == \
        ("alexnet_float", 3, 64, True, "x.pth")
    assert (args.start_epoch, args.amp, args.caffe_data, args.log_interval) == (26, "bf16", True, 7)
    assert run_defaults(args) == CAFFE_RUN  # the Caffe LMDBs: the run of the 2017 README's 44.87%


def test_default_workers_are_at_most_8_and_at_most_the_usable_cpus(monkeypatch) -> None:
    recipe = recipe_main()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(3)))
    assert recipe.default_workers() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert recipe.default_workers() == 8


def test_the_other_run_and_single_settings_can_be_chosen() -> None:
    parse = recipe_main().get_args_parser().parse_args
    assert run_defaults(parse(["--caffe"])) == CAFFE_RUN  # argparse's prefix of --caffe-data counts too
    assert run_defaults(parse(["--caffe-data", "--recipe", "2017-torchvision"])) == TORCHVISION_RUN
    assert run_defaults(parse(["--recipe=2017-caffe"])) == CAFFE_RUN
    args = parse(["--caffe-data", "--lr-epochs", "30", "--init-scale", "2", "--shuffle", "--wd", "0"])
    assert run_defaults(args) == ("2017-caffe", 2.0, 30, 0.0, True)
    assert run_defaults(parse(["--no-shuffle", "--init-scale", "1.5"]))[1:] == (1.5, 30, 3e-6, False)


def test_legacy_grad_multiplier_sets_1e9_and_only_explicitly() -> None:
    """Notes eq. (11): the 2017 ImageNet code put 1e9 on top of the factor of eq. (9)."""
    recipe = recipe_main()
    parse = recipe.get_args_parser().parse_args
    assert recipe.grad_multiplier(parse([])) == 1.0
    legacy = parse(["--legacy-grad-multiplier"])
    assert recipe.grad_multiplier(legacy) == 1e9 and legacy.grad_scale == "2017"
    assert recipe.grad_multiplier(parse(["--legacy-grad-multiplier", "--grad-scale", "1"])) == 1e9


def test_batch_size_is_split_over_processes() -> None:
    from imagenet_data import per_rank_batch_size

    assert per_rank_batch_size(256, 8) == 32 and per_rank_batch_size(256, 1) == 256
    with pytest.raises(UserError, match="not divisible"):
        per_rank_batch_size(100, 8)


def test_too_small_input_size_is_one_line_error(tmp_path) -> None:
    recipe = recipe_main()
    args = recipe.get_args_parser().parse_args(["--data", str(tmp_path), "--input-size", "66"])
    assert isinstance(args, argparse.Namespace)
    with pytest.raises(UserError, match="too small for AlexNet"):
        recipe.main(args)
