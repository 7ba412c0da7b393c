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
