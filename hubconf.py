"""torch.hub entry points: the shipped networks, with their checkpoints checked by SHA-256.

    import torch
    model = torch.hub.load("path/to/clone", "lenet5_xnor", source="local", pretrained=True)
    logits = model(images)   # images: float [N, 1, 28, 28], normalized as below

Everything is read from the clone (no network). ``pretrained=True`` checks the shipped file's
SHA-256 before loading it (``weights_only=True``) and returns the model in eval mode.

XNOR networks: the binarized layers compute with ``alpha * sign(W)``, which the repository's
training and evaluation apply around each forward pass (``BinOp``). With ``binarized=True``
(the default) the entry point writes those values into the weights once, so that a plain
``model(x)`` gives the network as evaluated: such a model is for inference only (the real
weights are gone; do not train it, and do not binarize it again with ``BinOp``, evaluation
scripts or the packed exporter). ``binarized=False`` keeps the real weights: for
fine-tuning, or for the repository's tools, which binarize by themselves.

MNIST input: float tensors [N, 1, 28, 28], pixels scaled to [0, 1], then normalized with
mean 0.1307 and std 0.3081 (``(x - 0.1307) / 0.3081``); the output is [N, 10] logits.

To add a network (e.g. CIFAR-10 NIN once a checkpoint is shipped): one entry in
``_CHECKPOINTS`` (recipe model file, --arch, file, SHA-256) and a three-line function below
that calls ``_build``; names without a leading underscore are what torch.hub lists.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pathlib
import sys
from types import ModuleType as _ModuleType

import torch.nn as nn

dependencies = ["torch", "numpy"]

_ROOT = pathlib.Path(__file__).resolve().parent

#: entry point -> (recipe model file, --arch, shipped checkpoint, its SHA-256), paths under the clone.
_CHECKPOINTS = {
    "lenet5_xnor": ("MNIST/lenet.py", "LeNet_5", "MNIST/models/LeNet_5.pth",
                    "c1f86a8108a3744a2e3299ae98ba1a84e236dc318d97f9a84eec8271e27a318d"),
    "lenet5_float": ("MNIST/lenet.py", "LeNet_5_float", "MNIST/models/LeNet_5_float.pth",
                     "d21eabd0aa1ccef88e0eb886d2a9198914142bcbf1ad77f7b7ca972476dd4115"),
    # CIFAR-10 and ImageNet: add e.g. "nin_xnor": ("CIFAR_10/nin.py", "nin", "CIFAR_10/models/nin.pth", "<sha256>")
}


def _recipe_module(relative: str) -> _ModuleType:
    """Import a recipe's model file (e.g. ``MNIST/lenet.py``) of this clone by path."""
    path = _ROOT / relative
    name = "_xnornet_hub_" + relative.replace("/", "_").removesuffix(".py")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verified(relative: str, expected: str) -> pathlib.Path:
    """The checkpoint's path once its SHA-256 matches ``expected``; a clear error otherwise."""
    path = _ROOT / relative
    if not path.is_file():
        raise FileNotFoundError(f"{relative} is missing from this clone ({_ROOT}): it holds the pretrained weights")
    actual = _sha256(path)
    if actual != expected:
        raise RuntimeError(f"{relative} fails its SHA-256 check (expected {expected}, got {actual}): "
                           "the file is damaged or not the shipped one; restore it from the repository")
    return path


def _build(entry: str, pretrained: bool, binarized: bool = False) -> nn.Module:
    """The network of ``entry``; with ``pretrained``, its verified weights, in eval mode."""
    from xnornet.binop import BinOp
    from xnornet.checkpoint import load_file, load_model_state, model_state_from

    model_file, arch, checkpoint_file, sha256 = _CHECKPOINTS[entry]
    model = _recipe_module(model_file).ARCHITECTURES[arch]()
    if not pretrained:
        return model
    checkpoint = load_file(_verified(checkpoint_file, sha256), f"{entry} checkpoint")
    if checkpoint.get("arch") not in (None, arch):
        raise RuntimeError(f"{checkpoint_file} holds --arch {checkpoint['arch']}, not {arch}")
    load_model_state(model, model_state_from(checkpoint), checkpoint_file)
    model.eval()
    if binarized:
        # BinOp's binarization without its restore: alpha * sign(W) stays in the weights.
        BinOp(model).binarization()
    return model


def lenet5_xnor(pretrained: bool = False, binarized: bool = True) -> nn.Module:
    """XNOR-Net LeNet-5 for MNIST (``--arch LeNet_5``); the shipped weights give 99.45% on the test set.

    pretrained: load ``MNIST/models/LeNet_5.pth`` (SHA-256 checked), eval mode.
    binarized: with ``pretrained``, write ``alpha * sign(W)`` into the binarized layers so that
        ``model(x)`` is the evaluated network (inference only); ``False`` keeps the real weights
        (for training, or for tools that binarize with ``BinOp`` themselves). Without
        ``pretrained`` the model is always the freshly initialized, trainable one.
    Input: [N, 1, 28, 28] MNIST images in [0, 1], normalized (x - 0.1307) / 0.3081; output [N, 10] logits.
    """
    return _build("lenet5_xnor", pretrained, binarized)


def lenet5_float(pretrained: bool = False) -> nn.Module:
    """The float LeNet-5 for MNIST (``--arch LeNet_5_float``); the shipped weights give 99.52%.

    pretrained: load ``MNIST/models/LeNet_5_float.pth`` (SHA-256 checked), eval mode.
    Input: [N, 1, 28, 28] MNIST images in [0, 1], normalized (x - 0.1307) / 0.3081; output [N, 10] logits.
    """
    return _build("lenet5_float", pretrained)
