"""Batched data augmentation on tensors, done where the batch lives (GPU or CPU).

No per-sample Python work: a whole batch is padded once and every crop (and
mirror) is read with one advanced-indexing gather.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def random_crop_flip(
    images: torch.Tensor,
    *,
    padding: int,
    generator: Optional[torch.Generator] = None,
    flip: bool = True,
    fill: float = 0.0,
) -> torch.Tensor:
    """Random crop of each image's own size from its zero-padded copy, then a random horizontal flip.

    ``images`` is ``[N, C, H, W]`` of any dtype on any device. Per image this is
    torchvision's ``RandomCrop(size=(H, W), padding=padding)`` followed by
    ``RandomHorizontalFlip(0.5)``. The random offsets and flips are drawn on the
    CPU from ``generator`` (so that a seeded run is reproducible on any device).
    The padding holds ``fill``: for already-normalized images, the normalized
    value of the background (MNIST: -mean/std), so a shifted digit sits on its
    own background rather than on a grey border.
    """
    if images.dim() != 4:
        raise ValueError(f"expected a batch [N, C, H, W], got shape {tuple(images.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, channels, height, width = images.shape
    offset_y = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    offset_x = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    mirrored = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)

    rows = offset_y[:, None] + torch.arange(height)  # [N, H] rows of the padded image
    cols = offset_x[:, None] + torch.arange(width)  # [N, W]
    # Mirroring the crop reads its columns right to left.
    cols = torch.where(mirrored[:, None], cols.flip(1), cols)

    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding), value=fill) if padding else images
    batch_index = torch.arange(n, device=device)[:, None, None, None]
    channel_index = torch.arange(channels, device=device)[None, :, None, None]
    return padded[batch_index, channel_index, rows.to(device)[:, None, :, None], cols.to(device)[:, None, None, :]]
