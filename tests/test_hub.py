"""hubconf.py: torch.hub.load(source="local") gives the evaluated networks; a damaged file is refused."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys

import pytest
import torch
import torch.nn as nn

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "MNIST"))
from lenet import build_model  # noqa: E402
from mnist_data import MEAN, STD  # noqa: E402

from xnornet.binop import BinOp  # noqa: E402
from xnornet.engine import evaluate, load_pretrained  # noqa: E402

XNOR_FILE = REPO_ROOT / "MNIST" / "models" / "LeNet_5.pth"
FLOAT_FILE = REPO_ROOT / "MNIST" / "models" / "LeNet_5_float.pth"


def synthetic_images(count: int = 16) -> torch.Tensor:
    """MNIST-like inputs: mostly dark images with a few bright strokes, normalized as the recipe does."""
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(count, 1, 28, 28, generator=generator) > 0.85).float()
    return (pixels - MEAN) / STD


def recipe_model(arch: str, path) -> nn.Module:
    """The model as MNIST/main.py --pretrained PATH --evaluate builds and loads it."""
    model = build_model(arch)
    load_pretrained(str(path), model, arch)
    return model.eval()


def hub_load(entry: str, repo=REPO_ROOT, **kwargs) -> nn.Module:
    return torch.hub.load(str(repo), entry, source="local", **kwargs)


def test_entry_points_are_listed():
    # torch.hub.list reads GitHub repositories only; this is its rule: callables not starting with "_".
    spec = importlib.util.spec_from_file_location("hubconf_listed", REPO_ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    entries = [name for name in dir(module) if callable(getattr(module, name)) and not name.startswith("_")]
    assert entries == ["lenet5_float", "lenet5_xnor"]
    assert module.dependencies == ["torch", "numpy"]


def test_xnor_hub_model_predicts_as_the_recipe_evaluation():
    images = synthetic_images()
    model = hub_load("lenet5_xnor", pretrained=True)
    assert not model.training
    with torch.no_grad():
        logits = model(images)
    reference = recipe_model("LeNet_5", XNOR_FILE)
    with torch.no_grad(), BinOp(reference).binarized():  # what xnornet.engine.evaluate does
        expected = reference(images)
    assert torch.equal(logits, expected)
    # The engine's own evaluation agrees with every hub prediction ...
    batches = [(images, logits.argmax(dim=1))]
    result = evaluate(reference, BinOp(reference), batches, nn.CrossEntropyLoss(), device=torch.device("cpu"))
    assert result["test_correct"] == len(images)
    # ... and the real-valued weights would not: the binarization is what the hub model applies.
    with torch.no_grad():
        assert not torch.allclose(reference(images), expected)


def test_xnor_hub_model_without_binarization_keeps_the_checkpoint_weights():
    model = hub_load("lenet5_xnor", pretrained=True, binarized=False)
    reference = recipe_model("LeNet_5", XNOR_FILE)
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in state)


def test_float_hub_model_predicts_as_the_recipe_evaluation():
    images = synthetic_images()
    with torch.no_grad():
        logits = hub_load("lenet5_float", pretrained=True)(images)
        expected = recipe_model("LeNet_5_float", FLOAT_FILE)(images)
    assert torch.equal(logits, expected)


def test_untrained_model_is_in_training_mode():
    model = hub_load("lenet5_xnor")
    assert model.training
    assert len(BinOp(model).target_modules) == 2


def test_hashes_match_the_readme():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    hubconf = (REPO_ROOT / "hubconf.py").read_text(encoding="utf-8")
    for name in ("LeNet_5.pth", "LeNet_5_float.pth"):
        row = re.search(rf"\| `MNIST/models/{re.escape(name)}` \|.*`([0-9a-f]{{64}})` \|", readme)
        assert row is not None, name
        assert row.group(1) in hubconf


def copy_of_the_clone(tmp_path):
    """hubconf.py, the model file and the shipped checkpoint, in a fresh folder."""
    (tmp_path / "MNIST" / "models").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "hubconf.py", tmp_path / "hubconf.py")
    shutil.copy(REPO_ROOT / "MNIST" / "lenet.py", tmp_path / "MNIST" / "lenet.py")
    target = tmp_path / "MNIST" / "models" / "LeNet_5.pth"
    shutil.copy(XNOR_FILE, target)
    return target


def test_a_damaged_checkpoint_fails_the_sha256_check(tmp_path):
    target = copy_of_the_clone(tmp_path)
    assert isinstance(hub_load("lenet5_xnor", repo=tmp_path, pretrained=True), nn.Module)  # the intact copy loads
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    target.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"MNIST/models/LeNet_5\.pth fails its SHA-256 check") as caught:
        hub_load("lenet5_xnor", repo=tmp_path, pretrained=True)
    assert "c1f86a8108a3744a2e3299ae98ba1a84e236dc318d97f9a84eec8271e27a318d" in str(caught.value)
    target.unlink()
    with pytest.raises(FileNotFoundError, match="LeNet_5.pth is missing"):
        hub_load("lenet5_xnor", repo=tmp_path, pretrained=True)
