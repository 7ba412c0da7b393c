"""Knowledge distillation from a float teacher: the training loss of a binarized student.

A binarized network trained to match the softened outputs of its float counterpart
(Hinton, Vinyals, Dean 2015) learns from the teacher's view of every class, not only
from the label. The teacher runs in eval mode, without gradients, on the same batch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class DistillationLoss(nn.Module):
    """``(1 - w) CE(s, y) + w T^2 KL(softmax(t / T) || softmax(s / T))``.

    ``s`` are the student's logits, ``t`` the teacher's on the same images, ``w`` the
    ``weight`` and ``T`` the ``temperature`` (the ``T^2`` keeps the gradient's scale
    independent of ``T``). :meth:`attach` hooks the student so that each training-mode
    forward pass also runs the teacher on its input; a forward pass in eval mode (the test
    pass) does not, and the loss is then the plain cross-entropy.
    """

    def __init__(self, teacher: nn.Module, weight: float = 0.5, temperature: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"distillation weight must be in [0, 1], got {weight}")
        if not temperature > 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        self.teacher = teacher.eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.weight = weight
        self.temperature = temperature
        self._teacher_logits: Optional[torch.Tensor] = None

    def train(self, mode: bool = True) -> "DistillationLoss":
        super().train(mode)
        self.teacher.eval()  # the teacher's BatchNorm and dropout stay in inference mode
        return self

    def attach(self, student: nn.Module) -> None:
        """Run the teacher on the input of every training-mode forward pass of ``student``."""
        student.register_forward_pre_hook(self._run_teacher)

    def _run_teacher(self, student: nn.Module, inputs: tuple) -> None:
        if not student.training:
            self._teacher_logits = None
            return
        with torch.no_grad():
            self._teacher_logits = self.teacher(inputs[0]).float()

    def forward(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hard = F.cross_entropy(output.float(), targets)
        teacher_logits, self._teacher_logits = self._teacher_logits, None
        if teacher_logits is None or self.weight == 0:
            return hard
        temperature = self.temperature
        soft = F.kl_div(F.log_softmax(output.float() / temperature, dim=1),
                        F.log_softmax(teacher_logits / temperature, dim=1),
                        reduction="batchmean", log_target=True) * temperature ** 2
        return (1.0 - self.weight) * hard + self.weight * soft
