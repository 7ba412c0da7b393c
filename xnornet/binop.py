"""BinOp: binarize the weights of every BinConv2d before the forward pass,
restore them after backward, and correct their gradient.

Equation numbers refer to ``notes/notes.md``. Training step::

    bin_op = BinOp(model)
    with bin_op.binarized():          # eq. (8), (1), (3); restores on exit
        loss = criterion(model(x), y)
        loss.backward()
    bin_op.updateBinaryGradWeight()   # eq. (7) times the factor of eq. (9)
    optimizer.step()
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Union

import torch
import torch.nn as nn

from .binarize import binary_sign
from .layers import BinConv2d

#: ``grad_scale`` value meaning the 2017 factor ``n * (1 - 1/C_in)`` per layer.
LEGACY_GRAD_SCALE = "2017"


def _filter_dims(weight: torch.Tensor) -> tuple:
    """All dimensions of a weight tensor except the output-channel one."""
    return tuple(range(1, weight.dim()))


def filter_alpha(weight: torch.Tensor) -> torch.Tensor:
    """Eq. (1): alpha = mean |W| per output filter, shaped to broadcast over ``weight``."""
    return weight.abs().mean(dim=_filter_dims(weight), keepdim=True)


def binarize_weight(weight: torch.Tensor) -> torch.Tensor:
    """Eq. (3): ``alpha * sign(W)`` with one alpha per output filter."""
    return filter_alpha(weight) * binary_sign(weight)


def center_and_clamp(weight: torch.Tensor) -> torch.Tensor:
    """Eq. (8): subtract the mean over the input-channel dimension, clamp to [-1, 1]."""
    return (weight - weight.mean(dim=1, keepdim=True)).clamp(-1.0, 1.0)


def scaled_sign_grad(weight: torch.Tensor, grad_binary: torch.Tensor) -> torch.Tensor:
    """Eq. (7): the gradient w.r.t. real weights ``W`` of ``alpha(W) * sign(W)``.

    ``dC/dW_i = (1/n) sign(W_i) sum_j dC/dW~_j sign(W_j) + dC/dW~_i alpha 1{|W_i| <= 1}``
    where ``grad_binary`` is ``dC/dW~`` and the sums run over one output filter.
    """
    dims = _filter_dims(weight)
    sign = binary_sign(weight)
    through_alpha = sign * (grad_binary * sign).mean(dim=dims, keepdim=True)
    through_sign = grad_binary * filter_alpha(weight) * (weight.abs() <= 1).to(weight.dtype)
    return through_alpha + through_sign


def legacy_grad_factor(weight: torch.Tensor) -> float:
    """Eq. (9): the 2017 code's factor ``n * (1 - 1/C_in)``.

    ``n`` is the number of elements per output filter, ``C_in`` the size of the
    weight's dimension 1 (input channels per group, or input features).
    """
    n = weight[0].numel()
    return n * (1.0 - 1.0 / weight.shape[1])


class BinOp:
    """Binarizes the conv/linear weight of every :class:`BinConv2d` in ``model``.

    Layers are chosen by type: first and last layers (plain Conv2d/Linear) and
    :class:`~xnornet.layers.FloatConv2d` blocks are never touched.

    ``grad_scale`` multiplies the corrected gradient of eq. (7): ``"2017"``
    (default) uses the 2017 code's per-layer factor ``n * (1 - 1/C_in)``, eq. (9);
    a number uses that constant (``1.0`` gives the pure formula).
    ``grad_multiplier`` is a further constant on top: the 2017 ImageNet code
    used ``1e9`` there, eq. (11); the default 1 leaves the gradient alone.
    """

    def __init__(
        self, model: nn.Module, grad_scale: Union[str, float] = LEGACY_GRAD_SCALE, grad_multiplier: float = 1.0
    ) -> None:
        if isinstance(grad_scale, str) and grad_scale != LEGACY_GRAD_SCALE:
            raise ValueError(f"grad_scale must be {LEGACY_GRAD_SCALE!r} or a number, got {grad_scale!r}")
        self.grad_scale = grad_scale
        self.grad_multiplier = float(grad_multiplier)
        self.target_modules: List[nn.Parameter] = [
            module.weight_layer.weight for module in model.modules() if isinstance(module, BinConv2d)
        ]
        self.saved_params: List[torch.Tensor] = [torch.empty(0) for _ in self.target_modules]
        self.is_binarized = False

    @property
    def num_of_params(self) -> int:
        return len(self.target_modules)

    @torch.no_grad()
    def binarization(self) -> None:
        """Center and clamp each weight (eq. 8), save it, replace it by alpha * sign (eq. 3)."""
        if self.is_binarized:
            raise RuntimeError("binarization() called twice without restore(): the real weights would be lost")
        for index, weight in enumerate(self.target_modules):
            real = center_and_clamp(weight)
            self.saved_params[index] = real
            # copy_ keeps the Parameter object (the optimizer, DDP hooks hold it).
            weight.copy_(binarize_weight(real))
        self.is_binarized = True

    @torch.no_grad()
    def restore(self) -> None:
        """Put the saved real-valued weights back, bit-exactly."""
        if not self.is_binarized:
            return
        for weight, saved in zip(self.target_modules, self.saved_params):
            weight.copy_(saved)
        self.is_binarized = False

    @torch.no_grad()
    def updateBinaryGradWeight(self) -> None:  # noqa: N802  (2017 spelling)
        """Replace each weight's gradient by eq. (7) times ``grad_scale`` and ``grad_multiplier``.

        Call after :meth:`restore`, before ``optimizer.step()``.
        """
        if self.is_binarized:
            raise RuntimeError("updateBinaryGradWeight() needs the real weights: call restore() first")
        for weight in self.target_modules:
            if weight.grad is None:
                continue
            factor = legacy_grad_factor(weight) if self.grad_scale == LEGACY_GRAD_SCALE else float(self.grad_scale)
            factor *= self.grad_multiplier
            weight.grad.copy_(scaled_sign_grad(weight, weight.grad) * factor)

    @contextlib.contextmanager
    def binarized(self) -> Iterator[None]:
        """Binarize on entry; always restore the real weights on exit, even on error."""
        self.binarization()
        try:
            yield
        finally:
            self.restore()

    # snake_case aliases; one implementation each.
    binarize = binarization
    update_binary_grad_weight = updateBinaryGradWeight
