"""engine.lr_at_epoch and cosine_lr_at_epoch: the schedules of the recipes (1-based epochs)."""

from __future__ import annotations

import pytest

from xnornet.engine import cosine_lr_at_epoch, lr_at_epoch


def test_lr_schedule_mnist_2017() -> None:
    """MNIST: lr 0.01, divided by 10 at epochs 15, 30, 45, 60 (--lr-epochs 15, 60 epochs)."""
    milestones = list(range(15, 61, 15))
    assert milestones == [15, 30, 45, 60]
    expected = {1: 1e-2, 14: 1e-2, 15: 1e-3, 29: 1e-3, 30: 1e-4, 44: 1e-4, 45: 1e-5, 59: 1e-5, 60: 1e-6}
    for epoch, lr in expected.items():
        assert lr_at_epoch(0.01, epoch, milestones) == pytest.approx(lr, rel=1e-12), epoch


def test_lr_schedule_cifar_2017() -> None:
    """CIFAR-10: divided by 10 at epochs 120, 200, 240, 280."""
    milestones = [120, 200, 240, 280]
    expected = {1: 1e-2, 119: 1e-2, 120: 1e-3, 199: 1e-3, 200: 1e-4, 239: 1e-4, 240: 1e-5, 279: 1e-5,
                280: 1e-6, 320: 1e-6}
    for epoch, lr in expected.items():
        assert lr_at_epoch(0.01, epoch, milestones) == pytest.approx(lr, rel=1e-12), epoch
    assert lr_at_epoch(0.5, 130, milestones, gamma=0.5) == pytest.approx(0.25, rel=1e-12)


def test_cosine_schedule_decays_from_the_base_rate_and_never_reaches_zero() -> None:
    """--lr-schedule cosine: base_lr * (1 + cos(pi * (epoch - 1) / epochs)) / 2, one value per epoch."""
    lrs = [cosine_lr_at_epoch(0.01, epoch, 60) for epoch in range(1, 61)]
    assert lrs[0] == pytest.approx(0.01, rel=1e-12)
    assert lrs[30] == pytest.approx(0.005, rel=1e-12)  # epoch 31: half way
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and 0 < lrs[-1] < 1e-5


def test_checkpoint_clock_fires_by_steps_and_by_minutes() -> None:
    """Within-epoch checkpoints: every N steps, or once M minutes have passed since the last one."""
    from xnornet.engine import CheckpointClock

    now = [0.0]
    by_steps = CheckpointClock(steps=3, clock=lambda: now[0])
    assert [step for step in range(1, 10) if by_steps.due(step)] == [3, 6, 9]
    by_time = CheckpointClock(minutes=2, clock=lambda: now[0])
    now[0] = 119.0
    assert not by_time.due(1)
    now[0] = 120.0
    assert by_time.due(2)
    by_time.reset()
    now[0] = 200.0
    assert not by_time.due(3)
    off = CheckpointClock(clock=lambda: now[0])
    now[0] = 1e9
    assert not any(off.due(step) for step in range(1, 100))


def test_presets_set_defaults_that_flags_override() -> None:
    """--recipe NAME: the preset's values unless a flag on the command line says otherwise."""
    from xnornet.cli import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--shift", type=int, default=0)
    parser.add_presets({"2017": {}, "fast": {"shift": 2, "epochs": 25}}, default="2017",
                       descriptions={"2017": "as 2017", "fast": "short"})
    assert vars(parser.parse_args([])) == {"epochs": 60, "shift": 0, "recipe": "2017"}
    assert vars(parser.parse_args(["--recipe", "fast"])) == {"epochs": 25, "shift": 2, "recipe": "fast"}
    assert vars(parser.parse_args(["--recipe=fast", "--epochs", "3"])) == {"epochs": 3, "shift": 2, "recipe": "fast"}
    assert vars(parser.parse_args(["--shift", "1", "--recipe", "fast"])) == {"epochs": 25, "shift": 1, "recipe": "fast"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--recipe", "nope"])


def test_precise_batchnorm_averages_the_batch_statistics_with_equal_weights() -> None:
    """recalibrate_batchnorm: running mean = mean of the batch means, running var = mean of the
    (unbiased) batch variances, over exactly ``steps`` batches; momentum and weights untouched."""
    import torch
    import torch.nn as nn

    from xnornet import BinConv2d, BinOp
    from xnornet.engine import recalibrate_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(2), BinConv2d(2, 3, kernel_size=1, stride=1, padding=0))
    bin_op = BinOp(model)
    with bin_op.binarized():  # BinOp keeps the centred weights (eq. 8) from the first pass on
        pass
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    batches = [(torch.randn(8, 2, 3, 3) * (i + 1) + i, torch.zeros(8)) for i in range(4)]
    used = recalibrate_batchnorm(model, bin_op, iter(batches), steps=3, device=torch.device("cpu"))
    assert used == 3
    first = model[0]
    seen = [b[0] for b in batches[:3]]
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen])
    variances = torch.stack([x.transpose(0, 1).reshape(2, -1).var(dim=1, correction=1) for x in seen])
    torch.testing.assert_close(first.running_mean, means.mean(dim=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first.running_var, variances.mean(dim=0), rtol=1e-5, atol=1e-6)
    assert first.momentum == 0.1 and model[1].bn.momentum == 0.1
    for key, value in weights.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-7)  # nothing trained


@pytest.mark.parametrize("count, batch_size, sizes", [
    (193, 32, [32] * 6),          # a last batch of one sample is left out
    (194, 32, [32] * 6 + [2]),    # a last batch of two is kept
    (192, 32, [32] * 6),
    (1, 4, []),
    (5, 1, [1] * 5),              # batch 1 (refused for training by the recipes) is not touched
])
def test_training_batches_never_end_in_a_single_sample(count: int, batch_size: int, sizes: list) -> None:
    """BatchNorm cannot train on one sample: iterate_tensors(drop_single_last=True) leaves such
    a last batch out, and train_batch_count, which the recipes pass as num_train_batches, agrees."""
    import torch

    from xnornet.engine import iterate_tensors, train_batch_count

    values = torch.arange(count, dtype=torch.float32)
    for generator in (None, torch.Generator().manual_seed(3)):
        batches = list(iterate_tensors(values, values.long(), batch_size, generator=generator, drop_single_last=True))
        assert [len(labels) for _, labels in batches] == sizes
        assert train_batch_count(count, batch_size) == len(sizes)
        seen = torch.cat([labels for _, labels in batches]) if batches else torch.empty(0, dtype=torch.long)
        assert len(set(seen.tolist())) == len(seen)  # no sample twice
    assert [len(t) for t, _ in iterate_tensors(values, values, batch_size)] == \
        [min(batch_size, count - begin) for begin in range(0, count, batch_size)]  # test batches: all kept


def test_evaluate_reports_progress_with_images_per_second(caplog) -> None:
    """A progress line at least every log_seconds during the test pass (here 0: after every batch)."""
    import logging

    import torch
    import torch.nn as nn

    from xnornet import BinOp
    from xnornet.engine import evaluate

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(3)]
    with caplog.at_level(logging.INFO, logger="xnornet"):
        result = evaluate(model, BinOp(model), batches, nn.CrossEntropyLoss(), device=torch.device("cpu"),
                          log_seconds=0.0)
    lines = [r.getMessage() for r in caplog.records if "images/s" in r.getMessage()]
    assert len(lines) == 3 and lines[-1].startswith("test [3/3] 15 images") and "ETA" in lines[-1]
    assert result["test_count"] == 15
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="xnornet"):
        evaluate(model, BinOp(model), iter(batches), nn.CrossEntropyLoss(), device=torch.device("cpu"),
                 desc="holdout", log_seconds=3600.0)
    assert not [r for r in caplog.records if "images/s" in r.getMessage()]  # quiet within the interval
    with caplog.at_level(logging.INFO, logger="xnornet"):
        evaluate(model, BinOp(model), iter(batches), nn.CrossEntropyLoss(), device=torch.device("cpu"),
                 desc="holdout", log_seconds=0.0)
    assert [r.getMessage() for r in caplog.records][-1].startswith("holdout: 15 images")  # no length: no ETA
