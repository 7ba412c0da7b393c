"""CIFAR_10/main.py end to end on tiny synthetic data sets in each layout (real NIN, CPU).

Train, checkpoint, evaluate (must reproduce the logged accuracy), resume (must
continue at the next epoch and match an uninterrupted run), and the errors for
wrong checkpoints and flags (checked in this process, to save interpreter starts;
tests/test_cifar_data.py checks that such errors reach the user as one line).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "CIFAR_10"))

from conftest import REPO_ROOT, load_module, run_script  # noqa: E402
from cifar_write import write_bin_layout, write_npy_layout, write_py_layout  # noqa: E402
from xnornet.cli import UserError  # noqa: E402

MAIN = "CIFAR_10/main.py"
FAST = ["--batch-size", "32", "--test-batch-size", "16", "--log-interval", "1"]


def load_main():
    """CIFAR_10/main.py as a module of its own name (other recipes also have a main.py)."""
    return load_module(MAIN, "cifar10_main")


def run_in_process(*argv):
    """CIFAR_10/main.py's main() in this process: no new interpreter (torch import) per run."""
    recipe = load_main()
    return recipe.main(recipe.get_args_parser().parse_args([str(a) for a in argv]))


def main_error(*argv) -> str:
    """The UserError message of CIFAR_10/main.py run in this process."""
    with pytest.raises(UserError) as err:
        run_in_process(*argv)
    return str(err.value)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """64 training / 32 test images in each layout, and one cache shared by the module."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 96)
    # Learnable: the class sets the mean brightness of one channel.
    images = rng.integers(0, 128, (96, 3, 32, 32)).astype(np.uint8)
    images[np.arange(96), labels % 3] += (12 * labels).astype(np.uint8)[:, None, None]
    train, test = (images[:64], labels[:64]), (images[64:], labels[64:])
    write_bin_layout(root / "bin", train, test)
    write_py_layout(root / "py", train, test)
    write_npy_layout(root / "npy", (train[0] / 64.0 - 1, train[1]), (test[0] / 64.0 - 1, test[1]), suffix=True)
    return {"root": root, "cache": root / "cache"}


def run_ok(*argv, cwd: Path = REPO_ROOT):
    result = run_script(MAIN, argv, cwd=cwd, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def train(data, out: Path, layout: str, *extra, cwd: Path = REPO_ROOT):
    return run_ok("--data", data["root"] / layout, "--cache-dir", data["cache"], "--output-dir", out, *FAST, *extra,
                  cwd=cwd)


def log_records(out: Path) -> list:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_seed_protocol_bin_layout(data, tmp_path):
    out = tmp_path / "run"
    train(data, out, "bin", "--epochs", "1", cwd=REPO_ROOT / "CIFAR_10")  # also works from the recipe folder
    records = log_records(out)
    assert records[0]["event"] == "start" and records[0]["git_commit"] and records[0]["hardware"]["cpu"]
    assert records[0]["args"]["data_layout"] == "bin" and records[0]["args"]["protocol"] == "seed"
    assert [r["epoch"] for r in records[1:]] == [1]
    assert records[1]["lr"] == pytest.approx(0.01) and records[1]["test_count"] == 32
    assert (out / "last.pth").is_file() and (out / "best.pth").is_file()
    assert [p.name[:16] for p in data["cache"].iterdir()] == ["cifar10-gcn-zca-"]  # GCN+ZCA cached, nothing else

    message = main_error("--data", data["root"] / "bin", "--cache-dir", data["cache"], "--arch", "nin_float",
                         "--epochs", "3", "--resume", out / "last.pth")
    assert "--arch nin_float (the run has nin)" in message


def test_standard_protocol_py_layout_train_evaluate_resume(data, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--data", data["root"] / "py", "--cache-dir", data["cache"], *FAST, "--protocol", "standard",
              "--milestones", "2", "--train-subset", "32", "--test-subset", "16")
    run_in_process("--epochs", "2", "--output-dir", straight, *common)
    run_ok("--epochs", "1", "--output-dir", split, *common)
    logged = log_records(split)[1]
    assert logged["epoch"] == 1 and logged["test_count"] == 16

    evaluated = json.loads(run_ok("--evaluate", "--resume", split / "last.pth", *common).stdout.splitlines()[-1])
    assert evaluated["test_acc"] == pytest.approx(logged["test_acc"])
    assert evaluated["test_loss"] == pytest.approx(logged["test_loss"], rel=1e-5)

    run_in_process("--epochs", "2", "--resume", split / "last.pth", *common)
    a, b = log_records(straight), log_records(split)
    assert [r.get("epoch") for r in b] == [None, 1, None, 2]  # a second header, then epoch 2 only
    assert torch.load(split / "last.pth", weights_only=True)["epoch"] == 2
    assert a[2]["lr"] == pytest.approx(0.001) and b[-1]["lr"] == pytest.approx(0.001)  # the milestone
    # The resumed run repeats the uninterrupted one: same shuffle, crops, flips and dropout.
    for key in ("train_loss", "test_loss", "test_acc"):
        assert b[-1][key] == pytest.approx(a[2][key], rel=1e-6, abs=1e-9), key
    state_a = torch.load(straight / "last.pth", weights_only=True)["state_dict"]
    state_b = torch.load(split / "last.pth", weights_only=True)["state_dict"]
    for key in state_a:
        assert torch.allclose(state_a[key].float(), state_b[key].float(), atol=1e-6), key


class _StopAfterSave(Exception):
    """Raised right after the chosen within-epoch checkpoint was written (a kill at that moment)."""


@pytest.mark.parametrize("precision", [(), ("--amp",)], ids=["fp32", "bf16"])
def test_resume_inside_an_epoch_is_bit_identical(data, tmp_path, monkeypatch, precision):
    """Stopped right after the checkpoint of epoch 2, step 2 (of 4), the run resumes at that
    step and ends with the weights, optimizer state and log of an uninterrupted run, bit for bit."""
    import xnornet.engine as engine

    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--data", data["root"] / "bin", "--cache-dir", data["cache"], "--batch-size", "16",
              "--test-batch-size", "16", "--crop-flip", "--holdout", "8", "--lr-schedule", "cosine",
              "--epochs", "3", "--checkpoint-steps", "1", *precision)
    run_in_process("--output-dir", straight, *common)

    real_save = engine.save_atomic

    def save_then_stop(obj, path):
        real_save(obj, path)
        if obj.get("epoch") == 1 and obj.get("partial", {}).get("step") == 2:
            raise _StopAfterSave()

    monkeypatch.setattr(engine, "save_atomic", save_then_stop)
    with pytest.raises(_StopAfterSave):
        run_in_process("--output-dir", split, *common)
    monkeypatch.setattr(engine, "save_atomic", real_save)
    interrupted = torch.load(split / "last.pth", weights_only=True)
    assert interrupted["epoch"] == 1 and interrupted["partial"]["step"] == 2
    run_in_process("--resume", split / "last.pth", *common)

    a, b = torch.load(straight / "last.pth", weights_only=True), torch.load(split / "last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3 and "partial" not in b
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for index, slot in a["optimizer"]["state"].items():
        for name, value in slot.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)
    timeless = ("train_seconds", "seconds")
    records_a = [{k: v for k, v in r.items() if k not in timeless} for r in log_records(straight) if "epoch" in r]
    records_b = [{k: v for k, v in r.items() if k not in timeless} for r in log_records(split) if "epoch" in r]
    assert [r["epoch"] for r in records_b] == [1, 2, 3]  # epoch 2 logged once, by the resumed run
    assert records_a == records_b
    assert "holdout_acc" in records_b[0] and records_b[0]["holdout_count"] == 8


def test_xnor_from_the_float_network_with_distillation(data, tmp_path):
    """--init-from copies the float NIN's weights into the XNOR NIN; --distill-from changes the
    training loss (not the test loss, which stays the cross-entropy)."""
    teacher_dir, plain, distilled = tmp_path / "float", tmp_path / "plain", tmp_path / "distilled"
    common = ("--data", data["root"] / "bin", "--cache-dir", data["cache"], *FAST, "--epochs", "1")
    run_in_process("--arch", "nin_float", "--output-dir", teacher_dir, *common)
    teacher = teacher_dir / "last.pth"
    run_in_process("--init-from", teacher, "--output-dir", plain, *common)
    run_in_process("--init-from", teacher, "--distill-from", teacher, "--distill-weight", "1",
                   "--output-dir", distilled, *common)
    a, b = log_records(plain)[-1], log_records(distilled)[-1]
    assert a["train_loss"] != b["train_loss"]
    assert log_records(distilled)[0]["args"]["distill_from"] == str(teacher)

    assert "--evaluate" in main_error("--evaluate", "--pretrained", teacher, "--arch", "nin_float",
                                      "--distill-from", teacher, *common)
    assert "--init-from" in main_error("--init-from", teacher, "--resume", plain / "last.pth", *common)


def test_2017_arrays_npy_layout(data, tmp_path, capsys):
    out = tmp_path / "run"
    common = ("--data", data["root"] / "npy", *FAST, "--arch", "nin_float", "--train-subset", "32",
              "--test-subset", "24")
    run_in_process("--epochs", "1", "--output-dir", out, *common)
    records = log_records(out)
    assert records[0]["args"]["data_layout"] == "npy" and records[1]["test_count"] == 24
    # A 2017-style file (best_acc + module.-prefixed state_dict) is accepted by --pretrained.
    state = torch.load(out / "last.pth", weights_only=True)["state_dict"]
    legacy = tmp_path / "nin.pth.tar"
    torch.save({"best_acc": 12.5, "state_dict": {f"module.{k}": v for k, v in state.items()}}, legacy)
    capsys.readouterr()
    result = run_in_process("--evaluate", "--pretrained", legacy, *common)
    assert result["test_acc"] == pytest.approx(records[1]["test_acc"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == result  # the printed result line


def test_wrong_architecture_checkpoint_names_the_keys(data, tmp_path):
    bad = tmp_path / "lenet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(20, 1, 5, 5), "xnor.0.weight": torch.zeros(1)}}, bad)
    message = main_error("--data", data["root"] / "npy", "--evaluate", "--pretrained", bad)
    for fragment in ("missing: xnor.0.bias", "unexpected: conv1.weight", "wrong shape: xnor.0.weight",
                     "check --arch"):
        assert fragment in message


@pytest.mark.parametrize("extra,fragments", [
    (["--protocol", "standard"], ("already GCN+ZCA", "--protocol seed")),
    (["--data-format", "bin"], ("'data_batch_1.bin' not found",)),
    (["--train-subset", "65"], ("--train-subset 65 exceeds the 64 training images",)),
])
def test_bad_flags_for_the_data_are_user_errors(data, extra, fragments):
    message = main_error("--data", data["root"] / "npy", "--epochs", "1", *extra)
    for fragment in fragments:
        assert fragment in message


def test_cache_inside_the_data_folder_is_refused(data):
    message = main_error("--data", data["root"] / "bin", "--cache-dir", data["root"] / "bin" / "cache",
                         "--epochs", "1")
    assert "inside --data" in message
    assert not (data["root"] / "bin" / "cache").exists()


def test_gpu_benchmark_runs_on_the_cpu(tmp_path):
    benchmark = load_module("CIFAR_10/benchmark_gpu.py", "cifar10_benchmark_gpu")
    log = tmp_path / "bench.jsonl"
    args = benchmark.get_args_parser().parse_args(
        ["--cpu", "--archs", "nin", "--steps", "1", "--warmup", "1", "--eval-steps", "1", "--batch-size", "4",
         "--test-batch-size", "4", "--protocol", "standard", "--log", str(log)])
    results = benchmark.main(args)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[0]["git_commit"] and records[0]["hardware"]["cpu"] and records[1:] == results
    assert [r["arch"] for r in results] == ["nin"] and results[0]["device"] == "cpu"
    for record in results:
        assert record["seconds_per_epoch"] > 0
        assert record["projected_hours_319_epochs"] == pytest.approx(record["seconds_per_epoch"] * 319 / 3600)


def test_milestones_must_increase_and_late_ones_are_reported(caplog):
    recipe = load_main()
    parse = recipe.get_args_parser().parse_args
    with pytest.raises(UserError, match="--milestones 300 100 must be increasing"):
        recipe.check_milestones(parse(["--milestones", "300", "100"]))
    with caplog.at_level("WARNING", logger="xnornet"):
        recipe.check_milestones(parse(["--milestones", "2", "5", "--epochs", "3"]))
        recipe.check_milestones(parse(["--milestones", "5", "--epochs", "3", "--lr-schedule", "cosine"]))
    assert [r.getMessage() for r in caplog.records] == [
        "warning: --milestones 5: past --epochs 3, so the learning rate never drops there in this run"]
