"""ImageNet recipe under torchrun (2 CPU processes, gloo), and resuming on another world size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT
from imagenet_fixtures import SMALL_ARGS, make_image_folder, run_in_process

from xnornet.checkpoint import load_file


def read_log(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def weight_digests(path: Path) -> dict:
    import hashlib

    state = load_file(path)["state_dict"]
    return {name: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() for name, t in state.items()}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> dict:
    """One epoch on 2 processes: 15 training images (DistributedSampler pads to 16: 4 steps of 2
    per rank), 9 validation images (odd: padding would count one twice)."""
    root = tmp_path_factory.mktemp("imagenet_ddp")
    data = make_image_folder(root / "data", classes=3, train_per_class=5, val_per_class=3)
    out, digests = root / "run", root / "digests.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO_ROOT / "tests" / "imagenet_ddp_helper.py"), str(digests),
               "--data", str(data), *map(str, SMALL_ARGS), "--epochs", "1", "--lr-epochs", "1", "--output-dir", str(out)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    return {"data": data, "out": out, "digests": json.loads(digests.read_text()), "stderr": result.stderr}


def test_ranks_hold_identical_weights_after_ddp_training(ddp_run: dict) -> None:
    digests = ddp_run["digests"]
    assert digests["world_size"] == 2 and digests["ddp"] is True
    rank0, rank1 = digests["ranks"]
    assert rank0.keys() == rank1.keys() and len(rank0) == 56
    assert rank0 == rank1, sorted(name for name in rank0 if rank0[name] != rank1[name])
    assert weight_digests(ddp_run["out"] / "last.pth") == rank0  # the checkpoint holds those weights


def test_rank0_alone_writes_and_validation_counts_each_image_once(ddp_run: dict) -> None:
    out = ddp_run["out"]
    assert sorted(p.name for p in out.iterdir()) == ["best.pth", "last.pth", "log.jsonl"]
    header, epoch = read_log(out / "log.jsonl")  # one header: rank 1 wrote nothing
    assert header["world_size"] == 2 and header["args"]["batch_size"] == 4
    assert epoch["epoch"] == 1 and epoch["test_count"] == 9
    assert ddp_run["stderr"].count("train epoch 1 [4/4]") == 1  # 16 padded samples / 2 ranks / 2 per batch


def test_resume_on_one_process_continues_at_epoch_2(ddp_run: dict, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    run_in_process(["--data", ddp_run["data"], *SMALL_ARGS, "--epochs", 2, "--lr-epochs", 1,
                    "--resume", ddp_run["out"] / "last.pth", "--output-dir", out])
    header, epoch = read_log(out / "log.jsonl")
    assert header["world_size"] == 1
    assert epoch["epoch"] == 2 and epoch["lr"] == pytest.approx(1e-4) and epoch["test_count"] == 9
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 2


def test_start_epoch_overrides_the_resumed_epoch(ddp_run: dict, tmp_path: Path) -> None:
    out = tmp_path / "jumped"
    run_in_process(["--data", ddp_run["data"], *SMALL_ARGS, "--epochs", 3, "--lr-epochs", 1, "--start-epoch", 3,
                    "--resume", ddp_run["out"] / "last.pth", "--output-dir", out])
    records = read_log(out / "log.jsonl")
    assert [r["epoch"] for r in records[1:]] == [3]
    assert records[1]["lr"] == pytest.approx(1e-5)  # 2017: 0.001 * 0.1 ** (2 // 1)
