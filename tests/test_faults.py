"""Recovery from faults: a run killed (SIGKILL) at many moments, including inside checkpoint
writes and between a checkpoint and its log line, resumes from whatever is on disk and ends
bit for bit where an uninterrupted run ends; the log has every epoch exactly once.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import torch

from conftest import run_script
from test_mnist_recipe import mnist_root  # noqa: F401  (the fixture: a tiny synthetic MNIST)
from xnornet.metrics import MetricsLog

SCRIPT = "MNIST/main.py"
#: 192 training images in batches of 32: 6 steps per epoch, 8 epochs; a checkpoint every step.
EPOCHS = 8
RUN = ["--batch-size", "32", "--test-batch-size", "50", "--log-interval", "3", "--epochs", str(EPOCHS),
       "--shift", "2", "--lr-schedule", "cosine", "--checkpoint-steps", "1"]
#: Where each interrupted process is killed: the N-th hit of a fault point (xnornet/faults.py)
#: in that process. Together they land in every phase of a checkpoint write (within an epoch
#: and at its end), between a checkpoint and its log line, and between steps.
KILLS = [
    "train.step:1", "save.begin:1", "save.written:1", "save.replaced:1", "train.step:3",
    "save.written:2", "log.write:2", "save.begin:3", "save.replaced:2", "train.step:2",
    "save.written:3", "log.write:3", "save.begin:2", "train.step:4", "save.replaced:3",
    "save.written:1", "log.write:2", "train.step:1", "save.begin:4", "save.written:4",
    "save.replaced:1", "log.write:3",
]


def epoch_records(path: Path) -> list:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    timeless = ("train_seconds", "seconds")
    return [{k: v for k, v in r.items() if k not in timeless} for r in records if "event" not in r]


def test_killed_at_22_moments_the_run_ends_bit_identical(mnist_root, tmp_path):  # noqa: F811
    mnist = mnist_root
    straight = run_script(SCRIPT, ["--data", mnist, "--output-dir", tmp_path / "straight", *RUN])
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "killed"
    kills, progress = 0, []
    for fault in KILLS:
        if (out / "last.pth").exists() and torch.load(out / "last.pth", weights_only=True)["epoch"] == EPOCHS:
            break  # finished: a kill between the last checkpoint and its log line was the last one
        resume = ["--resume", out / "last.pth"] if (out / "last.pth").exists() else []
        if not resume and out.exists():
            (out / "log.jsonl").unlink(missing_ok=True)  # killed before the first checkpoint: start again
        result = run_script(SCRIPT, ["--data", mnist, "--output-dir", out, *RUN, *resume],
                            env_extra={"XNORNET_FAULT": fault})
        if result.returncode == 0:
            break  # the run finished before this fault point was reached
        assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
        kills += 1
        for name in ("last.pth", "best.pth"):  # whatever is on disk always loads
            if (out / name).exists():
                torch.load(out / name, weights_only=True)
        if (out / "last.pth").exists():
            saved = torch.load(out / "last.pth", weights_only=True)
            progress.append((saved["epoch"], saved.get("partial", {}).get("step", 0)))
    assert kills >= 20
    assert progress == sorted(progress)  # what was saved is never lost
    if torch.load(out / "last.pth", weights_only=True)["epoch"] < EPOCHS:
        final = run_script(SCRIPT, ["--data", mnist, "--output-dir", out, *RUN, "--resume", out / "last.pth"])
        assert final.returncode == 0, final.stderr
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    b = torch.load(out / "last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == EPOCHS
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for index, slot in a["optimizer"]["state"].items():
        for name, value in slot.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)
    assert epoch_records(out / "log.jsonl") == epoch_records(tmp_path / "straight" / "log.jsonl")


def test_reconcile_drops_later_epochs_and_cut_lines_and_restores_a_missing_one(tmp_path):
    path = tmp_path / "log.jsonl"
    lines = [{"event": "start"}, {"epoch": 1, "a": 1}, {"epoch": 2, "a": 2}, {"event": "start"}, {"epoch": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"epoch": 4, "a"')
    log = MetricsLog(path)
    assert log.reconcile(2, {"epoch": 2, "a": 2}) == 1
    assert [json.loads(line) for line in path.read_text().splitlines()] == lines[:4]
    assert log.reconcile(3, {"epoch": 3, "b": 3}) == 0  # the checkpoint's own line comes back
    assert json.loads(path.read_text().splitlines()[-1]) == {"epoch": 3, "b": 3}
    before = path.read_bytes()
    assert log.reconcile(3, {"epoch": 3, "b": 3}) == 0 and path.read_bytes() == before  # nothing to do
