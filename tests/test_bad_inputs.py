"""Every entry point against a table of bad inputs, each in its own process.

Each case must end with a non-zero exit, no traceback, one line of error that names the
offending flag or file, and an earlier run's ``best.pth`` / ``last.pth`` (in the folder
``{run}``, which many cases point at) byte-identical afterwards, with nothing added beside them.

Placeholders in a case's arguments: ``{data}`` the entry point's tiny synthetic data set,
``{run}`` a run folder holding best.pth and last.pth of this recipe, ``{new}`` a folder that
does not exist yet, ``{file}`` a plain file, ``{trunc}`` a truncated checkpoint, ``{xnor}`` a
packed model, ``{other}`` a checkpoint of another recipe's network, ``{missing}`` a path
that does not exist, ``{cache}`` the CIFAR-10 cache; ``{log}`` a good training log and
``{empty}``, ``{broken}``, ``{scalar}``, ``{noacc}`` bad ones (see :func:`write_log_files`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, assert_one_line_error, load_module, run_script
from imagenet_fixtures import SMALL_ARGS, make_image_folder, recipe_main  # also puts ImageNet/ on sys.path
from test_cifar_main import data  # noqa: F401  (the CIFAR-10 fixture)
from test_cifar_main import load_main as load_cifar_main
from test_mnist_recipe import mnist_root  # noqa: F401  (the fixture)

sys.path.insert(0, str(REPO_ROOT / "MNIST"))
sys.path.insert(0, str(REPO_ROOT / "CIFAR_10"))

import alexnet  # noqa: E402
import lenet  # noqa: E402
import nin  # noqa: E402
from xnornet.checkpoint import BEST_NAME, LAST_NAME, save_atomic, training_checkpoint  # noqa: E402

MNIST, CIFAR, IMAGENET = "MNIST/main.py", "CIFAR_10/main.py", "ImageNet/main.py"
EXPORT, PLOT, SUMMARIZE = "-m xnornet.export", "-m xnornet.plot", "-m xnornet.summarize"

MNIST_ARGS = ["--data", "{data}", "--batch-size", "32", "--test-batch-size", "50", "--epochs", "1"]
CIFAR_ARGS = ["--data", "{data}", "--cache-dir", "{cache}", "--batch-size", "32", "--test-batch-size", "16",
              "--epochs", "1"]
IMAGENET_ARGS = ["--data", "{data}", *map(str, SMALL_ARGS), "--epochs", "1"]
TWO_PROCESSES = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}


@dataclass(frozen=True)
class Case:
    """One bad input: the arguments (with placeholders), the words its error line must hold."""

    name: str
    args: Sequence[str]
    names: Sequence[str]
    env: Dict[str, str] = field(default_factory=dict)


def case(name: str, args: Sequence[str], *names: str, env: Optional[Dict[str, str]] = None) -> Case:
    return Case(name, list(args), names, env or {})


CASES: Dict[str, List[Case]] = {
    MNIST: [
        case("negative-lr", [*MNIST_ARGS, "--lr", "-1", "--output-dir", "{run}"], "--lr"),
        case("negative-weight-decay", [*MNIST_ARGS, "--weight-decay", "-1", "--output-dir", "{run}"],
             "--weight-decay"),
        case("shift-past-the-image", [*MNIST_ARGS, "--shift", "40"], "--shift", "28"),
        case("output-dir-under-a-file", [*MNIST_ARGS, "--output-dir", "{file}/run"], "--output-dir", "is a file"),
        case("output-dir-unwritable", [*MNIST_ARGS, "--output-dir", "/proc/xnornet-run"], "--output-dir"),
        case("evaluate-without-model", [*MNIST_ARGS, "--evaluate"], "--evaluate"),
        case("truncated-checkpoint", [*MNIST_ARGS, "--pretrained", "{trunc}", "--evaluate"], "truncated.pth",
             "truncated or corrupt"),
        case("packed-file-as-checkpoint", [*MNIST_ARGS, "--pretrained", "{xnor}", "--evaluate", "--packed"],
             "model.xnor", "packed .xnor", "load_packed"),
        case("directory-as-checkpoint", [*MNIST_ARGS, "--pretrained", "{run}", "--evaluate"], "--pretrained",
             "is a directory"),
        case("checkpoint-of-another-recipe", [*MNIST_ARGS, "--pretrained", "{other}", "--evaluate"], "other.pth",
             "CIFAR_10/main.py"),
        case("holdout-too-large", [*MNIST_ARGS, "--holdout", "500", "--output-dir", "{new}"], "--holdout"),
        case("train-subset-too-large", [*MNIST_ARGS, "--train-subset", "5000", "--output-dir", "{new}"],
             "--train-subset"),
        case("batch-of-one", [*MNIST_ARGS, "--batch-size", "1", "--output-dir", "{new}"], "--batch-size"),
        case("fresh-run-over-checkpoints", [*MNIST_ARGS, "--output-dir", "{run}"], "--resume", "--output-dir"),
        case("resume-finished-run", [*MNIST_ARGS, "--resume", "{run}/last.pth"], "--epochs"),
        case("resume-with-missing-data", [*MNIST_ARGS, "--epochs", "3", "--resume", "{run}/last.pth",
                                          "--data", "{missing}"], "--data"),
    ],
    CIFAR: [
        case("negative-lr", [*CIFAR_ARGS, "--lr", "-1", "--output-dir", "{run}"], "--lr"),
        case("negative-weight-decay", [*CIFAR_ARGS, "--weight-decay", "-1"], "--weight-decay"),
        case("milestones-decreasing", [*CIFAR_ARGS, "--milestones", "300", "100"], "--milestones"),
        case("evaluate-without-model", [*CIFAR_ARGS, "--cache-dir", "{new}", "--evaluate"], "--evaluate"),
        case("checkpoint-of-another-recipe", [*CIFAR_ARGS, "--pretrained", "{other}", "--evaluate"], "other.pth",
             "MNIST/main.py"),
        case("packed-file-as-checkpoint", [*CIFAR_ARGS, "--pretrained", "{xnor}", "--evaluate"], "model.xnor",
             "packed .xnor"),
        case("truncated-checkpoint", [*CIFAR_ARGS, "--pretrained", "{trunc}", "--evaluate"], "truncated.pth"),
        case("output-dir-is-a-file", [*CIFAR_ARGS, "--output-dir", "{file}"], "--output-dir", "is a file"),
        case("train-subset-too-large", [*CIFAR_ARGS, "--train-subset", "1000", "--output-dir", "{new}"],
             "--train-subset"),
        case("test-subset-too-large", [*CIFAR_ARGS, "--test-subset", "1000", "--output-dir", "{new}"],
             "--test-subset"),
        case("holdout-too-large", [*CIFAR_ARGS, "--holdout", "64", "--output-dir", "{new}"], "--holdout"),
        case("batch-of-one", [*CIFAR_ARGS, "--batch-size", "1", "--output-dir", "{new}"], "--batch-size"),
        case("fresh-run-over-checkpoints", [*CIFAR_ARGS, "--output-dir", "{run}"], "--output-dir"),
        case("resume-finished-run", [*CIFAR_ARGS, "--resume", "{run}/last.pth"], "--epochs"),
        case("resume-with-other-arch", [*CIFAR_ARGS, "--epochs", "3", "--resume", "{run}/last.pth",
                                        "--arch", "nin_float"], "--arch nin_float"),
    ],
    IMAGENET: [
        case("negative-lr", [*IMAGENET_ARGS, "--lr", "-1", "--output-dir", "{run}"], "--lr"),
        case("negative-weight-decay", [*IMAGENET_ARGS, "--weight-decay", "-1"], "--weight-decay"),
        case("one-sample-per-process", [*IMAGENET_ARGS, "-b", "2", "--output-dir", "{new}"], "--batch-size",
             env=TWO_PROCESSES),
        case("batch-not-divisible", [*IMAGENET_ARGS, "-b", "3", "--output-dir", "{new}"], "--batch-size",
             env=TWO_PROCESSES),
        case("batch-of-one", [*IMAGENET_ARGS, "-b", "1", "--output-dir", "{new}"], "--batch-size"),
        case("resize-below-crop", [*IMAGENET_ARGS, "--resize", "60"], "--resize"),
        case("evaluate-without-model", [*IMAGENET_ARGS, "--evaluate"], "--evaluate"),
        case("checkpoint-of-another-recipe", [*IMAGENET_ARGS, "--pretrained", "{other}", "--evaluate"],
             "other.pth", "MNIST/main.py"),
        case("packed-file-as-checkpoint", [*IMAGENET_ARGS, "--pretrained", "{xnor}", "--evaluate"], "model.xnor"),
        case("output-dir-under-a-file", [*IMAGENET_ARGS, "--output-dir", "{file}/run"], "--output-dir"),
        case("fresh-run-over-checkpoints", [*IMAGENET_ARGS, "--output-dir", "{run}"], "--output-dir"),
        case("resume-finished-run", [*IMAGENET_ARGS, "--resume", "{run}/last.pth"], "--epochs"),
        case("start-epoch-past-epochs", [*IMAGENET_ARGS, "--start-epoch", "3", "--output-dir", "{new}"],
             "--start-epoch"),
        case("negative-workers", [*IMAGENET_ARGS, "--workers", "-1"], "--workers"),
    ],
    EXPORT: [
        case("missing-checkpoint", ["{missing}", "-o", "{new}/m.xnor"], "missing.pth", "does not exist"),
        case("directory-as-checkpoint", ["{run}", "-o", "{new}/m.xnor"], "is a directory"),
        case("packed-file-as-checkpoint", ["{xnor}", "-o", "{new}/m.xnor"], "model.xnor", "packed .xnor"),
        case("truncated-checkpoint", ["{trunc}", "-o", "{new}/m.xnor"], "truncated.pth"),
        case("no-output", ["{run}/best.pth"], "--output"),
        case("output-is-a-directory", ["{run}/best.pth", "-o", "{run}"], "--output", "is a directory"),
        case("output-under-a-file", ["{run}/best.pth", "-o", "{file}/m.xnor"], "--output", "is a file"),
        case("output-over-a-checkpoint", ["{run}/best.pth", "-o", "{run}/last.pth"], "--output", "not replacing"),
        case("output-is-the-input", ["{run}/best.pth", "-o", "{run}/best.pth"], "--output", "checkpoint itself"),
        case("arch-of-another-network", ["{run}/best.pth", "--arch", "nin", "-o", "{new}/m.xnor"], "--arch"),
        case("unknown-arch", ["{run}/best.pth", "--arch", "resnet50", "-o", "{new}/m.xnor"], "resnet50"),
        case("model-args-not-an-object", ["{run}/best.pth", "--model-args", "[1]", "-o", "{new}/m.xnor"],
             "--model-args"),
        case("model-args-not-json", ["{run}/best.pth", "--model-args", "{{x", "-o", "{new}/m.xnor"],
             "--model-args"),
        case("model-args-unknown", ["{run}/best.pth", "--model-args", '{{"bogus": 1}}', "-o", "{new}/m.xnor"],
             "bogus"),
    ],
    PLOT: [
        case("missing-log", ["{missing}", "-o", "{new}/c.png"], "missing.pth", "does not exist"),
        case("directory-as-log", ["{run}", "-o", "{new}/c.png"], "is a directory"),
        case("header-only-log", ["{file}", "-o", "{new}/c.png"], "plain.txt"),
        case("checkpoint-as-log", ["{run}/best.pth", "-o", "{new}/c.png"], "best.pth"),
        case("output-over-a-checkpoint", ["{log}", "-o", "{run}/best.pth"], "--output", ".pth"),
        case("output-without-suffix", ["{log}", "-o", "{new}/curves"], "--output", "no suffix"),
        case("output-is-a-directory", ["{log}", "-o", "{run}"], "--output", "is a directory"),
        case("output-under-a-file", ["{log}", "-o", "{file}/c.png"], "--output", "is a file"),
        case("ylim-reversed", ["{log}", "-o", "{new}/c.png", "--ylim", "99", "98"], "--ylim"),
        case("ylim-infinite", ["{log}", "-o", "{new}/c.png", "--ylim", "0", "inf"], "--ylim"),
        case("labels-per-log", ["{log}", "-o", "{new}/c.png", "--label", "a", "--label", "b"], "--label"),
        case("dpi-zero", ["{log}", "-o", "{new}/c.png", "--dpi", "0"], "--dpi"),
        case("size-zero", ["{log}", "-o", "{new}/c.png", "--size", "0", "1"], "--size"),
    ],
    SUMMARIZE: [
        case("no-log", [], "logs"),
        case("missing-log", ["{missing}"], "missing.pth", "does not exist"),
        case("directory-as-log", ["{run}"], "is a directory"),
        case("header-only-log", ["{file}"], "plain.txt", "no epoch record"),
        case("checkpoint-as-log", ["{run}/best.pth"], "best.pth"),
        case("unknown-flag", ["{log}", "--bogus"], "--bogus"),
        case("second-log-missing", ["{log}", "{missing}"], "missing.pth"),
        case("empty-log", ["{empty}"], "empty.jsonl", "no epoch record"),
        case("bad-middle-line", ["{broken}"], "broken.jsonl", "line 2"),
        case("non-object-line", ["{scalar}"], "scalar.jsonl", "line 1"),
        case("epochs-without-accuracy", ["{noacc}"], "noacc.jsonl", "test accuracy"),
        case("binary-file", ["{xnor}"], "model.xnor"),
    ],
}


def fill(args: Sequence[str], **values: object) -> List[str]:
    """``args`` with their placeholders replaced."""
    return [arg.format(**{key: str(value) for key, value in values.items()}) for arg in args]


def file_digests(folder: Path) -> Dict[str, str]:
    """SHA-256 of every file in ``folder`` (hidden ones too: a left-over temporary file shows)."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def write_run(folder: Path, arch: str, model: torch.nn.Module, recipe_args: argparse.Namespace) -> Path:
    """best.pth and last.pth of a run that finished epoch 1, as the engine writes them."""
    folder.mkdir(parents=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    checkpoint = training_checkpoint(arch=arch, model=model, optimizer=optimizer, epoch=1, best_acc=50.0,
                                     last_acc=50.0, args=vars(recipe_args))
    save_atomic(checkpoint, folder / LAST_NAME)
    save_atomic(checkpoint, folder / BEST_NAME)
    return folder


def write_log_files(root: Path) -> Dict[str, Path]:
    """Training logs, good and bad, for the log readers."""
    header = {"event": "start", "arch": "LeNet_5", "args": {"arch": "LeNet_5", "seed": 1, "resume": None}}
    epoch = {"epoch": 1, "lr": 0.01, "train_loss": 0.5, "test_loss": 0.4, "test_acc": 90.0, "seconds": 1.0}
    files = {
        "log": [json.dumps(header), json.dumps(epoch)],
        "empty": [],
        "broken": [json.dumps(header), "{not json", json.dumps(epoch)],
        "scalar": ["3", json.dumps(epoch)],
        "noacc": [json.dumps(header), json.dumps({"epoch": 1, "train_loss": 0.5})],
    }
    paths = {}
    for name, lines in files.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        paths[name] = path
    return paths


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Dict[str, Path]:
    """The files every entry point's cases share: a plain file, a packed model, logs."""
    from safetensors.numpy import save_file

    from xnornet.packed.fileformat import FORMAT_NAME

    root = tmp_path_factory.mktemp("shared")
    plain = root / "plain.txt"
    plain.write_text(json.dumps({"event": "start", "args": {}}) + "\n", encoding="utf-8")  # a header, no epoch
    xnor = root / "model.xnor"
    save_file({"weight_bits": np.zeros(2, dtype=np.uint64)}, str(xnor), metadata={"format": FORMAT_NAME})
    return {"file": plain, "xnor": xnor, "missing": root / "missing.pth", **write_log_files(root)}


def mnist_context(request, root: Path) -> Dict[str, Path]:
    images = request.getfixturevalue("mnist_root")
    parser_args = load_recipe(MNIST).get_args_parser().parse_args(fill(MNIST_ARGS, data=images))
    run = write_run(root / "run", "LeNet_5", lenet.build_model("LeNet_5"), parser_args)
    torch.save({"arch": "nin", "state_dict": nin.build_model("nin").state_dict()}, root / "other.pth")
    return {"data": images, "run": run, "other": root / "other.pth"}


def cifar_context(request, root: Path) -> Dict[str, Path]:
    cifar = request.getfixturevalue("data")
    parser_args = load_cifar_main().get_args_parser().parse_args(
        fill(CIFAR_ARGS, data=cifar["root"] / "bin", cache=cifar["cache"]))
    run = write_run(root / "run", "nin", nin.build_model("nin"), parser_args)
    torch.save({"arch": "LeNet_5", "state_dict": lenet.build_model("LeNet_5").state_dict()}, root / "other.pth")
    return {"data": cifar["root"] / "bin", "cache": cifar["cache"], "run": run, "other": root / "other.pth"}


def imagenet_context(request, root: Path) -> Dict[str, Path]:
    images = make_image_folder(root / "data", classes=3, train_per_class=2, val_per_class=1)
    parser_args = recipe_main().get_args_parser().parse_args(fill(IMAGENET_ARGS, data=images))
    model = alexnet.build_model("alexnet", num_classes=3, input_size=67, hidden_features=32)
    run = write_run(root / "run", "alexnet", model, parser_args)
    torch.save({"arch": "LeNet_5_float", "state_dict": lenet.build_model("LeNet_5_float").state_dict()},
               root / "other.pth")
    return {"data": images, "run": run, "other": root / "other.pth"}


def tool_context(request, root: Path) -> Dict[str, Path]:
    """The tools (export, plot, summarize) get an MNIST run to point at."""
    return mnist_context(request, root)


CONTEXTS = {MNIST: mnist_context, CIFAR: cifar_context, IMAGENET: imagenet_context,
            EXPORT: tool_context, PLOT: tool_context, SUMMARIZE: tool_context}


def load_recipe(script: str):
    """A recipe's main.py as a module of its own name (they are all called main.py)."""
    return load_module(script, f"bad_inputs_{Path(script).parent.name}")


@pytest.fixture(scope="module")
def contexts(request, tmp_path_factory, shared) -> Callable[[str], Dict[str, Path]]:
    """Per entry point, built on first use: its data, run folder and checkpoints."""
    built: Dict[str, Dict[str, Path]] = {}

    def get(entry: str) -> Dict[str, Path]:
        if entry not in built:
            root = tmp_path_factory.mktemp(entry_name(entry))
            context = {**shared, **CONTEXTS[entry](request, root)}
            best = context["run"] / BEST_NAME
            truncated = root / "truncated.pth"
            truncated.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
            built[entry] = {**context, "trunc": truncated}
        return built[entry]

    return get


def entry_name(entry: str) -> str:
    """``MNIST`` for MNIST/main.py, ``export`` for -m xnornet.export."""
    return Path(entry).parent.name if entry.endswith(".py") else entry.rsplit(".", 1)[-1]


def table() -> List[Tuple[str, Case]]:
    return [(entry, item) for entry, items in CASES.items() for item in items]


@pytest.mark.parametrize("entry,bad", table(), ids=[f"{entry_name(e)}-{c.name}" for e, c in table()])
def test_bad_input_ends_in_one_line_and_keeps_the_run(entry: str, bad: Case, contexts, tmp_path: Path) -> None:
    context = {key: str(value) for key, value in contexts(entry).items()}
    context["new"] = str(tmp_path / "new")
    argv = fill(bad.args, **context)
    run = Path(context["run"])
    before = file_digests(run)
    result = run_script(entry, argv, timeout=120, env_extra=bad.env)
    assert_one_line_error(result, *bad.names)
    assert "error" in result.stderr.strip().splitlines()[-1], result.stderr  # the error line comes last
    assert file_digests(run) == before, "the earlier run's files changed"
    assert not (tmp_path / "new").exists(), "a folder (output or cache) was made for a run that never started"
