"""xnornet.distill.DistillationLoss against a hand-written formula, and its teacher hook."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from xnornet.distill import DistillationLoss


def _hand_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, weight: float, t: float):
    """(1 - w) CE + w T^2 mean over the batch of sum_c p_c (log p_c - log q_c), p = softmax(teacher / T)."""
    total = 0.0
    for s_row, t_row, y in zip(student.tolist(), teacher.tolist(), targets.tolist()):
        log_z = math.log(sum(math.exp(v) for v in s_row))
        ce = log_z - s_row[y]
        p = [math.exp(v / t) for v in t_row]
        q = [math.exp(v / t) for v in s_row]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        kl = sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q))
        total += (1 - weight) * ce + weight * t * t * kl
    return total / len(targets)


class _Fixed(nn.Module):
    """A 'network' whose logits are a fixed linear map of its input."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 5)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed)
            self.linear.weight.copy_(torch.randn(5, 4, generator=generator))
            self.linear.bias.copy_(torch.randn(5, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@pytest.mark.parametrize("weight,temperature", [(0.5, 1.0), (1.0, 4.0), (0.25, 2.0)])
def test_loss_equals_the_hand_formula_in_training_mode(weight, temperature) -> None:
    student, teacher = _Fixed(1).double(), _Fixed(2).double()
    loss_fn = DistillationLoss(teacher, weight=weight, temperature=temperature)
    loss_fn.attach(student)
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    student.train()
    output = student(x)
    expected = _hand_loss(output.detach().double(), teacher(x).detach().double(), y, weight, temperature)
    assert loss_fn(output, y).item() == pytest.approx(expected, rel=1e-5)


def test_eval_mode_forward_gives_plain_cross_entropy_and_the_teacher_gets_no_gradient() -> None:
    student, teacher = _Fixed(1), _Fixed(2)
    loss_fn = DistillationLoss(teacher, weight=1.0)
    loss_fn.attach(student)
    x, y = torch.randn(3, 4), torch.tensor([1, 2, 3])
    student.eval()
    output = student(x)
    assert loss_fn(output, y).item() == pytest.approx(nn.functional.cross_entropy(output, y).item(), rel=1e-6)
    student.train()
    loss_fn(student(x), y).backward()
    assert teacher.linear.weight.grad is None and student.linear.weight.grad is not None
    loss_fn.train()
    assert not loss_fn.teacher.training  # the teacher stays in inference mode


def test_a_student_equal_to_its_teacher_has_no_distillation_term() -> None:
    student = _Fixed(1)
    teacher = _Fixed(1)
    loss_fn = DistillationLoss(teacher, weight=1.0, temperature=3.0)
    loss_fn.attach(student)
    student.train()
    assert loss_fn(student(torch.randn(4, 4)), torch.tensor([0, 1, 2, 3])).item() == pytest.approx(0.0, abs=1e-6)
