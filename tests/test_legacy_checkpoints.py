"""2017 checkpoints as PyTorch 0.2-0.4 wrote them, through each recipe's ``--pretrained PATH --evaluate``.

Such a file uses the legacy (non-zip) serialization, lacks the BatchNorm ``num_batches_tracked``
counters (PyTorch 0.4.1 added them), may hold the 2017 ``module.`` / ``features.module.`` key
prefixes, and has the 2017 dict keys. Each must evaluate exactly as the same weights saved the
modern way. LeNet-5, NIN and AlexNet (small input, narrow classifier) on synthetic data, in this
process.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import REPO_ROOT, load_module
from imagenet_fixtures import SMALL_ARGS, make_image_folder, run_in_process as run_imagenet

for _folder in ("MNIST", "CIFAR_10"):
    sys.path.insert(0, str(REPO_ROOT / _folder))

from cifar_write import write_npy_layout  # noqa: E402  (recipe-local)
from mnist_data import IMAGE_MAGIC, LABEL_MAGIC  # noqa: E402
from test_mnist_recipe import synthetic_digits, write_idx  # noqa: E402


def recipe(folder: str) -> ModuleType:
    """``<folder>/main.py`` imported under a name of its own (every recipe has a main.py)."""
    name = f"legacy_test_{folder.lower()}_main"
    if name not in sys.modules:
        sys.modules[name] = load_module(f"{folder}/main.py", name)
    return sys.modules[name]


def evaluate(folder: str, argv: list) -> dict:
    if folder == "ImageNet":
        return run_imagenet(argv)
    main = recipe(folder)
    return main.main(main.get_args_parser().parse_args([str(a) for a in argv]))


def trained_looking(model: nn.Module, seed: int) -> Dict[str, torch.Tensor]:
    """``model``'s state with BatchNorm statistics and scales away from their initial values
    (counters non-zero, as after training)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.running_mean.normal_(0.0, 0.3, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.num_batches_tracked.fill_(123)
                if module.affine:
                    module.weight.uniform_(0.2, 1.5, generator=generator)
                    module.bias.normal_(0.0, 0.3, generator=generator)
    return {key: value.clone() for key, value in model.state_dict().items()}


def save_both(state: Dict[str, torch.Tensor], tmp_path: Path, arch: str, rename: Callable[[str], str],
              legacy_keys: dict) -> tuple:
    """The same weights as a modern file and as a PyTorch 0.2-0.4 file with the 2017 keys."""
    modern = tmp_path / "modern.pth"
    torch.save({"arch": arch, "state_dict": state, "acc": 12.5}, modern)
    old_state = {rename(key): value for key, value in state.items() if not key.endswith(".num_batches_tracked")}
    assert len(old_state) < len(state)
    legacy = tmp_path / "legacy.pth.tar"
    torch.save({**legacy_keys, "state_dict": old_state}, legacy, _use_new_zipfile_serialization=False)
    assert zipfile.is_zipfile(modern) and not zipfile.is_zipfile(legacy)
    return modern, legacy


def assert_same_evaluation(folder: str, common: list, modern: Path, legacy: Path) -> None:
    expected = evaluate(folder, [*common, "--evaluate", "--pretrained", modern])
    result = evaluate(folder, [*common, "--evaluate", "--pretrained", legacy])
    assert result["test_count"] == expected["test_count"] > 0
    for key in [k for k in expected if k.startswith("test_acc")] + ["test_correct"]:
        assert result[key] == expected[key], key
    assert result["test_loss"] == pytest.approx(expected["test_loss"], rel=1e-12)


def test_lenet5_2017_file(tmp_path: Path) -> None:
    """MNIST 2017 files: {acc, state_dict}, keys without a prefix (the 2017 script stripped ``module.``)."""
    root = tmp_path / "mnist"
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix, count in (("train", 64), ("t10k", 60)):
        images, labels = synthetic_digits(count, rng)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", IMAGE_MAGIC, images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", LABEL_MAGIC, labels)
    lenet = recipe("MNIST").build_model("LeNet_5")
    modern, legacy = save_both(trained_looking(lenet, 1), tmp_path, "LeNet_5", lambda key: key,
                               {"acc": 99.23})
    assert_same_evaluation("MNIST", ["--data", root, "--test-batch-size", 25], modern, legacy)


def test_nin_2017_file(tmp_path: Path) -> None:
    """CIFAR-10 2017 files: {best_acc, state_dict}, keys of a DataParallel model (``module.``)."""
    rng = np.random.default_rng(2)
    images = rng.normal(0.0, 1.0, (40, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, 40)
    data = write_npy_layout(tmp_path / "npy", (images[:16], labels[:16]), (images[16:], labels[16:]), suffix=True)
    nin = recipe("CIFAR_10").build_model("nin")
    modern, legacy = save_both(trained_looking(nin, 2), tmp_path, "nin", lambda key: f"module.{key}",
                               {"best_acc": 86.28})
    assert_same_evaluation("CIFAR_10", ["--data", data, "--batch-size", 8, "--test-batch-size", 8], modern, legacy)


def test_alexnet_2017_file(tmp_path: Path) -> None:
    """ImageNet 2017 files: {epoch, arch, state_dict, best_prec1, optimizer}, with only ``features``
    wrapped in DataParallel (``features.module.0.weight``)."""
    data = make_image_folder(tmp_path / "imagenet")
    alexnet = recipe("ImageNet").build_model("alexnet", num_classes=3, input_size=67, hidden_features=32)
    optimizer = torch.optim.Adam(alexnet.parameters(), lr=0.001)
    modern, legacy = save_both(trained_looking(alexnet, 3), tmp_path, "alexnet",
                               lambda key: key.replace("features.", "features.module.", 1),
                               {"epoch": 55, "arch": "alexnet", "best_prec1": 44.87,
                                "optimizer": optimizer.state_dict()})
    assert "features.module.0.weight" in torch.load(legacy, weights_only=True)["state_dict"]
    assert_same_evaluation("ImageNet", ["--data", data, *SMALL_ARGS], modern, legacy)
