"""End-to-end tests of MNIST/main.py on a tiny synthetic MNIST written as IDX files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, assert_one_line_error, run_script

sys.path.insert(0, str(REPO_ROOT / "MNIST"))
from lenet import ARCHITECTURES, build_model  # noqa: E402
from mnist_data import IMAGE_MAGIC, LABEL_MAGIC, load_split  # noqa: E402

SCRIPT = "MNIST/main.py"
FAST = ["--batch-size", "32", "--test-batch-size", "50", "--log-interval", "4"]


def write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def synthetic_digits(count: int, rng: np.random.Generator) -> tuple:
    """Images whose class is a bright 6x6 square at one of ten places, plus noise: learnable fast."""
    labels = rng.integers(0, 10, size=count)
    images = rng.integers(0, 60, size=(count, 28, 28))
    for index, label in enumerate(labels):
        row, col = 2 + 12 * (label // 5), 2 + 5 * (label % 5)
        images[index, row:row + 6, col:col + 6] = 255
    return images, labels


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mnist")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 192), ("t10k", 100)):
        images, labels = synthetic_digits(count, rng)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", IMAGE_MAGIC, images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", LABEL_MAGIC, labels)
    return root


@pytest.fixture(scope="module")
def trained_run(mnist_root, tmp_path_factory) -> Path:
    """Two epochs of the XNOR LeNet-5, uninterrupted."""
    out = tmp_path_factory.mktemp("run2")
    result = run_script(SCRIPT, ["--data", mnist_root, "--epochs", "2", "--output-dir", out, *FAST])
    assert result.returncode == 0, result.stderr
    return out


def epoch_records(log_path: Path) -> list:
    return [r for r in map(json.loads, log_path.read_text().splitlines()) if "epoch" in r]


def test_idx_reader_round_trip(mnist_root):
    images, labels = load_split(mnist_root, "test")
    assert images.shape == (100, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (100,) and labels.dtype == torch.int64


def test_state_dict_keys_match_2017():
    keys = set(build_model("LeNet_5").state_dict())
    for key in ("conv1.weight", "bn_conv1.running_mean", "bin_conv2.bn.weight", "bin_conv2.conv.weight",
                "bin_ip1.bn.weight", "bin_ip1.linear.weight", "ip2.weight"):
        assert key in keys
    assert build_model("LeNet_5").bin_ip1.bn.num_features == 50
    for arch in ARCHITECTURES:  # every variant loads every other's weights
        assert set(build_model(arch).state_dict()) == keys


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_affine_batchnorm_scale_is_clamped_to_0_01_as_in_2017(arch):
    """The 2017 LeNet-5 clamps every affine BatchNorm scale (its two blocks') to >= 0.01 in its forward pass."""
    model = build_model(arch)
    affine = [m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) and m.affine]
    assert [bn.num_features for bn in affine] == [20, 50]
    assert model.bin_conv2.bn_scale_floor == model.bin_ip1.bn_scale_floor == 0.01
    with torch.no_grad():
        for bn in affine:
            bn.weight[:2] = torch.tensor([-0.5, 0.001])
    model.eval()(torch.randn(1, 1, 28, 28))
    assert all(bn.weight[0].item() == bn.weight[1].item() == pytest.approx(0.01) for bn in affine)


def test_train_checkpoint_log(trained_run):
    records = epoch_records(trained_run / "log.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("lr", "train_loss", "test_loss", "test_acc", "seconds"):
        assert all(key in r for r in records)
    header = json.loads((trained_run / "log.jsonl").read_text().splitlines()[0])
    assert header["event"] == "start" and "git_commit" in header and "cpu" in header["hardware"]
    last = torch.load(trained_run / "last.pth", weights_only=True)
    assert last["epoch"] == 2 and last["arch"] == "LeNet_5"
    assert {"state_dict", "optimizer", "best_acc", "last_acc", "args", "rng"} <= set(last)
    assert records[-1]["test_acc"] > 30, "the synthetic task is easy; the network should learn it"


def test_evaluate_reproduces_logged_accuracy(trained_run, mnist_root):
    logged = epoch_records(trained_run / "log.jsonl")[-1]["test_acc"]
    result = run_script(SCRIPT, ["--data", mnist_root, "--pretrained", trained_run / "last.pth", "--evaluate"])
    assert result.returncode == 0, result.stderr
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    assert evaluated["test_acc"] == pytest.approx(logged, abs=1e-9)


def test_resume_is_bit_identical_with_shifts_and_cosine(mnist_root, tmp_path):
    """Our recipe's flags: the shifts and the schedule depend only on (seed, epoch), so resuming is exact."""
    ours = ["--shift", "2", "--lr-schedule", "cosine", *FAST]
    straight = run_script(SCRIPT, ["--data", mnist_root, "--epochs", "2", "--output-dir", tmp_path / "a", *ours])
    assert straight.returncode == 0, straight.stderr
    first = run_script(SCRIPT, ["--data", mnist_root, "--epochs", "1", "--output-dir", tmp_path / "b", *ours])
    assert first.returncode == 0, first.stderr
    unshifted = run_script(SCRIPT, ["--data", mnist_root, "--epochs", "1", "--output-dir", tmp_path / "c",
                                    "--lr-schedule", "cosine", *FAST])
    assert unshifted.returncode == 0, unshifted.stderr
    one_epoch = [torch.load(tmp_path / run / "last.pth", weights_only=True)["state_dict"] for run in ("b", "c")]
    assert not torch.equal(one_epoch[0]["conv1.weight"], one_epoch[1]["conv1.weight"])  # --shift is applied
    conflicting = run_script(SCRIPT, ["--data", mnist_root, "--epochs", "2", "--resume",
                                      tmp_path / "b" / "last.pth", "--shift", "1"])
    assert_one_line_error(conflicting, "--shift 1 (the run has 2)")
    # Only --epochs given again: the run's own shifts, schedule and batch size are restored.
    resumed = run_script(SCRIPT, ["--data", mnist_root, "--epochs", "2", "--resume", tmp_path / "b" / "last.pth"])
    assert resumed.returncode == 0, resumed.stderr
    second_header = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()][2]
    assert second_header["event"] == "start" and second_header["args"]["shift"] == 2
    assert second_header["args"]["lr_schedule"] == "cosine" and second_header["args"]["batch_size"] == 32
    a = torch.load(tmp_path / "a" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pth", weights_only=True)
    assert all(torch.equal(value, b["state_dict"][key]) for key, value in a["state_dict"].items())
    lrs = [r["lr"] for r in epoch_records(tmp_path / "a" / "log.jsonl")]
    assert lrs[0] == pytest.approx(0.01) and lrs[1] == pytest.approx(0.005)  # cosine over 2 epochs


def test_resume_is_bit_identical(trained_run, mnist_root, tmp_path):
    first = run_script(SCRIPT, ["--data", mnist_root, "--epochs", "1", "--output-dir", tmp_path, *FAST])
    assert first.returncode == 0, first.stderr
    resumed = run_script(SCRIPT, ["--data", mnist_root, "--epochs", "2", "--resume", tmp_path / "last.pth", *FAST])
    assert resumed.returncode == 0, resumed.stderr
    assert [r["epoch"] for r in epoch_records(tmp_path / "log.jsonl")] == [1, 2]
    straight = torch.load(trained_run / "last.pth", weights_only=True)
    continued = torch.load(tmp_path / "last.pth", weights_only=True)
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, continued["state_dict"][key]), key
    assert straight["last_acc"] == continued["last_acc"]


def test_2017_format_checkpoint_is_accepted(trained_run, mnist_root, tmp_path):
    state = torch.load(trained_run / "best.pth", weights_only=True)["state_dict"]
    legacy = tmp_path / "LeNet_5.best.pth.tar"
    torch.save({"acc": 12.5, "state_dict": {f"module.{k}": v for k, v in state.items()}}, legacy)
    result = run_script(SCRIPT, ["--data", mnist_root, "--pretrained", legacy, "--evaluate"])
    assert result.returncode == 0, result.stderr


def test_float_counterpart_trains(mnist_root, tmp_path):
    result = run_script(SCRIPT, ["--data", mnist_root, "--arch", "LeNet_5_float", "--epochs", "1",
                                 "--output-dir", tmp_path, *FAST])
    assert result.returncode == 0, result.stderr
    assert epoch_records(tmp_path / "log.jsonl")[0]["test_acc"] > 30


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--epochs", "0"], ["--epochs", "positive"]),
        (["--batch-size", "-3"], ["--batch-size", "positive"]),
        (["--pretrained", "does/not/exist.pth", "--evaluate"], ["does/not/exist.pth", "does not exist"]),
        (["--resume", "nowhere.pth"], ["nowhere.pth", "does not exist"]),
        (["--evaluate"], ["--pretrained"]),
    ],
)
def test_bad_flags(mnist_root, flags, fragments):
    assert_one_line_error(run_script(SCRIPT, ["--data", mnist_root, *flags]), *fragments)


def test_missing_data_names_file_and_download(tmp_path):
    result = run_script(SCRIPT, ["--data", tmp_path, "--epochs", "1"])
    assert_one_line_error(result, "train-images-idx3-ubyte", "--download")


def test_truncated_idx_file(mnist_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in (mnist_root / "MNIST" / "raw").iterdir():
        raw.joinpath(path.name).write_bytes(path.read_bytes())
    broken = raw / "t10k-images-idx3-ubyte"
    broken.write_bytes(broken.read_bytes()[:-100])
    assert_one_line_error(run_script(SCRIPT, ["--data", tmp_path, "--epochs", "1"]), "t10k-images", "truncated")


def test_corrupt_checkpoint(mnist_root, tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    result = run_script(SCRIPT, ["--data", mnist_root, "--pretrained", corrupt, "--evaluate"])
    assert_one_line_error(result, "corrupt.pth", "not a readable")


def test_checkpoint_of_another_variant_names_its_arch(trained_run, mnist_root):
    """XNOR and float LeNet-5 share their keys: the checkpoint's arch must decide."""
    result = run_script(SCRIPT, ["--data", mnist_root, "--arch", "LeNet_5_float",
                                 "--pretrained", trained_run / "best.pth", "--evaluate"])
    assert_one_line_error(result, "trained as --arch LeNet_5", "pass --arch LeNet_5")


def test_checkpoint_of_another_architecture(mnist_root, tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"xnor.0.weight": torch.zeros(192, 3, 5, 5)}}, other)
    result = run_script(SCRIPT, ["--data", mnist_root, "--pretrained", other, "--evaluate"])
    assert_one_line_error(result, "unexpected: xnor.0.weight", "missing: bin_conv2.bn.bias")


def test_fresh_run_refuses_to_overwrite(trained_run, mnist_root):
    before = (trained_run / "best.pth").read_bytes()
    result = run_script(SCRIPT, ["--data", mnist_root, "--epochs", "1", "--output-dir", trained_run, *FAST])
    assert_one_line_error(result, "--resume", "--output-dir")
    assert (trained_run / "best.pth").read_bytes() == before


def test_non_finite_loss_stops_and_keeps_best(trained_run, mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("last.pth", "best.pth", "log.jsonl"):
        (run_dir / name).write_bytes((trained_run / name).read_bytes())
    best_before = (run_dir / "best.pth").read_bytes()
    last_before = (run_dir / "last.pth").read_bytes()
    result = run_script(SCRIPT, ["--data", mnist_root, "--arch", "LeNet_5", "--epochs", "3",
                                 "--resume", run_dir / "last.pth", "--lr", "1e38", *FAST])
    assert_one_line_error(result, "loss became", "without saving")
    assert (run_dir / "best.pth").read_bytes() == best_before
    assert (run_dir / "last.pth").read_bytes() == last_before


def test_subsets_and_holdout_cut_the_tensors(mnist_root, tmp_path):
    """--train-subset / --test-subset (shared with CIFAR-10) take the first N images; --holdout
    the last of the training subset."""
    out = tmp_path / "run"
    result = run_script(SCRIPT, ["--data", mnist_root, "--epochs", "1", "--output-dir", out, *FAST,
                                 "--train-subset", "40", "--test-subset", "20", "--holdout", "8"])
    assert result.returncode == 0, result.stderr
    (record,) = epoch_records(out / "log.jsonl")
    assert record["test_count"] == 20 and record["holdout_count"] == 8
    assert "train epoch 1 [1/1]" in result.stderr  # 32 images left to train on, one batch of 32
