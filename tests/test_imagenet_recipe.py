"""ImageNet recipe end to end on synthetic data: both layouts train one epoch and evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, run_script
from imagenet_fixtures import SMALL_ARGS, make_caffe_lmdb, make_image_folder, run_in_process

from xnornet.cli import UserError


def read_log(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_image_folder_trains_one_epoch_then_evaluates_top1_top5(tmp_path: Path, capsys) -> None:
    # In this process, to save the start-up of a second interpreter (the CLI is run below and by the DDP test).
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    run_in_process(["--data", data, *SMALL_ARGS, "--epochs", 1, "--output-dir", out])
    header, epoch = read_log(out / "log.jsonl")
    assert header["event"] == "start" and header["world_size"] == 1 and header["git_commit"]
    assert header["args"]["num_classes"] is None and header["args"]["grad_scale"] == "2017"
    # image folders: the final 2017 code's torchvision run
    assert header["args"]["recipe"] == "2017-torchvision" and header["args"]["shuffle"] is True
    assert (header["args"]["init_scale"], header["args"]["lr_epochs"]) == (2.0, 30)
    assert epoch["epoch"] == 1 and epoch["lr"] == 0.001 and epoch["test_count"] == 6
    assert {"test_acc", "test_acc5", "train_loss"} <= set(epoch)
    checkpoint = torch.load(out / "last.pth", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["arch"] == "alexnet"
    assert checkpoint["state_dict"]["classifier.4.weight"].shape == (3, 32)  # 3 class folders

    run_in_process(["--data", data, *SMALL_ARGS, "--evaluate", "--pretrained", out / "last.pth"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["test_count"] == 6
    for key in ("test_loss", "test_acc", "test_acc5"):  # evaluation repeats the epoch's test exactly
        assert printed[key] == pytest.approx(epoch[key], abs=1e-9)


def test_caffe_lmdb_trains_one_epoch_with_two_workers_and_the_1e9_multiplier(tmp_path: Path) -> None:
    # In this process too; the two workers are forked DataLoader processes all the same.
    data = make_caffe_lmdb(tmp_path / "data")
    out = tmp_path / "run"
    result = run_in_process(["--data", data, "--caffe-data", "--num-classes", 3, *SMALL_ARGS, "--workers", 2,
                             "--legacy-grad-multiplier", "--epochs", 1, "--output-dir", out])
    assert result["output_dir"] == str(out)
    header, epoch = read_log(out / "log.jsonl")
    assert header["args"]["caffe_data"] is True and header["args"]["workers"] == 2
    # the Caffe LMDBs: the 2017 run of top-1 44.87%, records in key order
    assert header["args"]["recipe"] == "2017-caffe" and header["args"]["shuffle"] is False
    assert (header["args"]["init_scale"], header["args"]["lr_epochs"], header["args"]["weight_decay"]) == \
        (1.0, 25, 1e-5)
    # what run_recipe hands to BinOp: the 2017 factor, then 1e9 on top (notes eq. 11)
    assert header["args"]["grad_scale"] == "2017" and header["args"]["grad_multiplier"] == 1e9
    assert epoch["epoch"] == 1 and epoch["test_count"] == 6 and "test_acc5" in epoch


def test_bad_input_is_one_line_and_nonzero_exit(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=1, val_per_class=1)
    result = run_script("ImageNet/main.py", ["--data", data / "train", *SMALL_ARGS])  # from the repository root
    assert_one_line_error(result, "has no 'train' folder", "--caffe-data")


def test_bad_record_found_mid_epoch_by_a_worker_is_one_line(tmp_path: Path) -> None:
    from caffe_proto import Datum  # recipe-local; imagenet_fixtures put ImageNet/ on sys.path

    bad = Datum(channels=3, height=72, width=72, data=b"\0" * 10, label=0).SerializeToString()
    data = make_caffe_lmdb(tmp_path / "data", bad_last_train=bad)
    with pytest.raises(UserError) as caught:
        run_in_process(["--data", data, "--caffe-data", "--num-classes", 3, *SMALL_ARGS, "--workers", 2,
                        "--epochs", 1, "--output-dir", tmp_path / "run"])
    assert str(caught.value) == (f"record '00000011' of {data}/ilsvrc12_train_lmdb: Datum holds 10 data bytes, "
                                 "but channels x height x width = 3 x 72 x 72 = 15552")


def test_a_last_training_batch_of_one_image_is_left_out(tmp_path: Path, caplog) -> None:
    """9 training images in batches of 4: 4, 4 and 1. BatchNorm cannot train on the single
    image (AlexNet's classifier BatchNorm1d stopped with a traceback): the epoch is 2 steps."""
    data = make_image_folder(tmp_path / "data", classes=3, train_per_class=3, val_per_class=1)
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="xnornet"):
        run_in_process(["--data", data, *SMALL_ARGS, "--epochs", 1, "--output-dir", out])
    _, epoch = read_log(out / "log.jsonl")
    assert epoch["epoch"] == 1 and epoch["test_count"] == 3
    assert any("train epoch 1 [2/2]" in record.getMessage() for record in caplog.records)
