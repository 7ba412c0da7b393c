"""Reading training logs back (xnornet.metrics.read_run_log, python -m xnornet.summarize), and
what a fresh run does with a log.jsonl already in its folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, run_script
from test_mnist_recipe import mnist_root  # noqa: F401  (the fixture)
from xnornet.cli import UserError
from xnornet.engine import check_output_dir
from xnornet.metrics import read_run_log


def header(seed: int = 1, resume=None, arch: str = "LeNet_5") -> dict:
    return {"event": "start", "arch": arch, "git_commit": f"{seed}" * 40,
            "args": {"arch": arch, "seed": seed, "resume": resume}}


def epoch(number: int, acc: float) -> dict:
    return {"epoch": number, "lr": 0.01, "train_loss": 1.0 / number, "test_loss": 0.5, "test_acc": acc,
            "seconds": 36.0}


def write(path: Path, records: list, tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")
    return path


def test_a_header_only_run_before_a_fresh_one_is_passed_over(tmp_path: Path) -> None:
    """A run stopped in its first epoch leaves a header; the next run into the folder logs
    after it (logs written before fresh runs started their log anew): its epochs are the run."""
    log = write(tmp_path / "log.jsonl", [header(seed=7), header(seed=2), epoch(1, 90.0), epoch(2, 91.0)])
    headers, epochs = read_run_log(log)
    assert [h["args"]["seed"] for h in headers] == [2]
    assert [e["epoch"] for e in epochs] == [1, 2]


def test_a_resumed_run_is_one_run_with_the_last_record_of_each_epoch(tmp_path: Path) -> None:
    log = write(tmp_path / "log.jsonl", [header(), epoch(1, 90.0), epoch(2, 80.0),
                                         header(resume="best.pth"), epoch(2, 92.0), epoch(3, 93.0)])
    headers, epochs = read_run_log(log)
    assert len(headers) == 2 and headers[1]["args"]["resume"] == "best.pth"
    assert [(e["epoch"], e["test_acc"]) for e in epochs] == [(1, 90.0), (2, 92.0), (3, 93.0)]


def test_of_two_fresh_runs_in_one_log_the_last_is_read(tmp_path: Path) -> None:
    log = write(tmp_path / "log.jsonl", [header(seed=1), epoch(1, 50.0), epoch(2, 60.0), header(seed=2),
                                         epoch(1, 70.0)])
    headers, epochs = read_run_log(log)
    assert headers[0]["args"]["seed"] == 2 and [e["test_acc"] for e in epochs] == [70.0]


def test_a_last_line_cut_short_is_skipped_and_other_bad_lines_are_errors(tmp_path: Path) -> None:
    torn = write(tmp_path / "torn.jsonl", [header(), epoch(1, 90.0)], tail='{"epoch": 2, "tra')
    assert [e["epoch"] for e in read_run_log(torn)[1]] == [1]
    broken = write(tmp_path / "broken.jsonl", [header()], tail='{"epoch": 2, "tra\n' + json.dumps(epoch(1, 1.0)))
    with pytest.raises(UserError, match="line 2 is not JSON"):
        read_run_log(broken)
    with pytest.raises(UserError, match="no epoch record"):
        read_run_log(write(tmp_path / "header.jsonl", [header(), header(seed=2)]))


def test_summarize_reports_the_epochs_of_a_log_with_two_headers(tmp_path: Path) -> None:
    """The rerun into a folder whose first run stopped before finishing an epoch."""
    log = write(tmp_path / "log.jsonl", [header(seed=1), header(seed=3), epoch(1, 90.0), epoch(2, 95.5),
                                         epoch(3, 95.0)])
    result = subprocess.run([sys.executable, "-m", "xnornet.summarize", str(log)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    row = result.stdout.splitlines()[2]
    assert row.split(" | ")[1:7] == ["LeNet_5", "3", "3", "95.00", "95.50 (2)", "0.03"], row
    assert "3333333333" in row and "1111111111" not in row  # the commit of the run it reports


def test_summarize_and_plot_start_without_torch() -> None:
    """Reading logs needs no torch: the log tools start in a fraction of a second."""
    code = "import sys, xnornet.summarize, xnornet.plot; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_a_fresh_run_refuses_a_folder_whose_log_holds_finished_epochs(tmp_path: Path) -> None:
    write(tmp_path / "log.jsonl", [header(), epoch(1, 90.0)])
    with pytest.raises(UserError, match="log.jsonl with 1 epoch record"):
        check_output_dir(tmp_path, resuming=False)
    check_output_dir(tmp_path, resuming=True)  # a resumed run appends to it
    write(tmp_path / "log.jsonl", [header(), header()])
    check_output_dir(tmp_path, resuming=False)  # no finished epoch: the run starts the log anew


def test_a_rerun_into_a_folder_with_a_header_only_log_starts_the_log_anew(mnist_root, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    write(out / "log.jsonl", [header(seed=9)])  # a first run stopped during its first epoch
    result = run_script("MNIST/main.py", ["--data", mnist_root, "--epochs", "1", "--batch-size", "64",
                                          "--output-dir", out])
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r.get("event", "epoch") for r in records] == ["start", "epoch"]
    assert records[0]["args"]["seed"] == 1 and "starting" in result.stderr and "anew" in result.stderr
