"""The two data protocols, turning the arrays read from disk into tensors on the device.

- ``seed`` (2017): GCN + ZCA fitted on the training set (cached), no augmentation.
  The 2017 ``npy`` arrays are already GCN+ZCA and are used as they are.
- ``standard``: per-channel mean/std of the training set, random crop 32 with
  zero padding 4 and horizontal flip, done batched on the device.

Either protocol may turn the crop and flip on or off (``crop_flip``; on the GCN+ZCA data
the padding is 0, the images' mean) and hold the last training images out (``holdout``).

The whole dataset stays on the device; a batch is a slice of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from cifar_data import RawCifar
from gcn_zca import cached_gcn_zca
from xnornet.augment import random_crop_flip
from xnornet.cli import UserError
from xnornet.recipe import subset_size

LOG = logging.getLogger("xnornet")

PROTOCOLS = ("seed", "standard")
CROP_PADDING = 4

#: ``transform(batch, generator)`` applied to each training batch.
Transform = Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]


@dataclass
class PreparedData:
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    train_transform: Optional[Transform] = None
    holdout_images: Optional[torch.Tensor] = None
    holdout_labels: Optional[torch.Tensor] = None


def channel_stats(images: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (population) of uint8 images [N, 3, H, W], on the [0, 1] scale."""
    pixels = torch.from_numpy(images).permute(1, 0, 2, 3).reshape(images.shape[1], -1).double() / 255.0
    return pixels.mean(dim=1).float(), pixels.std(dim=1, correction=0).float()


def prepare(
    raw: RawCifar,
    protocol: str,
    *,
    device: torch.device,
    cache_dir: Path,
    train_subset: Optional[int] = None,
    test_subset: Optional[int] = None,
    memory_format: torch.memory_format = torch.contiguous_format,
    crop_flip: Optional[bool] = None,
    holdout: int = 0,
) -> PreparedData:
    """Tensors on ``device`` for ``protocol``; subsets are the first N images, taken after preprocessing.

    ``crop_flip`` None means the protocol's own choice (standard: on, seed: off).
    ``holdout`` moves the last N images of the (subset of the) training set into
    ``holdout_images`` / ``holdout_labels``, normalized like the test images.
    """
    n_train = subset_size(train_subset, len(raw.train_labels), "--train-subset", "training")
    n_test = subset_size(test_subset, len(raw.test_labels), "--test-subset", "test")
    if holdout >= n_train:
        raise UserError(f"--holdout {holdout} leaves no training image of the {n_train}")
    n_fit = n_train - holdout
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}")
    if crop_flip is None:
        crop_flip = protocol == "standard"

    def on_device(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(images)).to(device).contiguous(memory_format=memory_format)

    labels = torch.from_numpy(raw.train_labels[:n_train]).to(device)
    train_labels, holdout_labels = labels[:n_fit], labels[n_fit:]
    test_labels = torch.from_numpy(raw.test_labels[:n_test]).to(device)

    if protocol == "seed":
        if raw.preprocessed:
            LOG.info("using the GCN+ZCA arrays of %s as they are", raw.folder)
            train, test = raw.train_images, raw.test_images
        else:
            train, test = cached_gcn_zca(raw.train_images, raw.test_images, cache_dir, device)
        transform = None
        if crop_flip:
            def transform(batch: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
                cropped = random_crop_flip(batch, padding=CROP_PADDING, generator=generator)
                return cropped.contiguous(memory_format=memory_format)

        return PreparedData(
            on_device(train[:n_fit]), train_labels, on_device(test[:n_test]), test_labels, train_transform=transform,
            holdout_images=on_device(train[n_fit:n_train]) if holdout else None,
            holdout_labels=holdout_labels if holdout else None,
        )

    if raw.preprocessed:
        raise UserError(
            f"--protocol standard needs raw pixels, but {raw.folder} holds the 2017 arrays, already GCN+ZCA "
            "whitened: use --protocol seed, or a py/bin layout"
        )
    mean, std = channel_stats(raw.train_images)
    LOG.info("per-channel mean %s std %s", [round(v, 4) for v in mean.tolist()], [round(v, 4) for v in std.tolist()])
    scale = (255.0 * std).to(device).view(1, -1, 1, 1)
    shift = (255.0 * mean).to(device).view(1, -1, 1, 1)

    def normalize(pixels: torch.Tensor) -> torch.Tensor:
        return ((pixels.float() - shift) / scale).contiguous(memory_format=memory_format)

    def augment(batch: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        # Crop and flip the uint8 pixels (zero padding = black, as torchvision pads), then normalize.
        if crop_flip:
            batch = random_crop_flip(batch, padding=CROP_PADDING, generator=generator)
        return normalize(batch)

    # Training pixels stay uint8 on the device (4x smaller); test images are normalized once.
    train_pixels = torch.from_numpy(raw.train_images[:n_fit].copy()).to(device)
    test_images = normalize(torch.from_numpy(raw.test_images[:n_test].copy()).to(device))
    held = normalize(torch.from_numpy(raw.train_images[n_fit:n_train].copy()).to(device)) if holdout else None
    return PreparedData(train_pixels, train_labels, test_images, test_labels, train_transform=augment,
                        holdout_images=held, holdout_labels=holdout_labels if holdout else None)
