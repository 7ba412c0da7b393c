"""MNIST from torchvision's raw IDX files, decoded once into tensors.

Nothing is written to the data folder (``--download`` aside, which asks
torchvision to fetch the files there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch

from xnornet.cli import UserError
from xnornet.download import torchvision_download

MEAN, STD = 0.1307, 0.3081
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


def _find(root: Path, name: str) -> Path:
    candidates = [root / "MNIST" / "raw" / name, root / "raw" / name, root / name]
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(
        f"MNIST file {name!r} not found under --data {str(root)!r} (looked in {root}/MNIST/raw, {root}/raw, {root}); "
        "pass --download to fetch it with torchvision, or point --data at the folder holding MNIST/raw"
    )


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (big-endian int32 header, then uint8 data) as a numpy array."""
    raw = np.fromfile(path, dtype=np.uint8)
    dims = 3 if magic == IMAGE_MAGIC else 1
    header_bytes = 4 * (1 + dims)
    if raw.size < header_bytes:
        raise UserError(f"{path} is too short to be an IDX file ({raw.size} bytes)")
    header = raw[:header_bytes].view(">i4")
    if int(header[0]) != magic:
        raise UserError(f"{path} is not an MNIST IDX file: magic number {int(header[0])}, expected {magic}")
    shape = tuple(int(v) for v in header[1:])
    expected = int(np.prod(shape))
    if raw.size - header_bytes != expected:
        raise UserError(f"{path} is truncated or corrupt: {raw.size - header_bytes} data bytes, expected {expected}")
    return raw[header_bytes:].reshape(shape)


def load_split(root: Path, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 28, 28] and int64 labels [N] of ``split`` ('train' or 'test')."""
    image_name, label_name = FILES[split]
    images = read_idx(_find(root, image_name), IMAGE_MAGIC)
    labels = read_idx(_find(root, label_name), LABEL_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise UserError(f"MNIST {split}: label {int(labels.max())} out of range 0-9")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 1, 28, 28], the 2017 normalization (ToTensor + Normalize)."""
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)


# The normalized value of a black (0) pixel, computed the way normalize() does it, so that
# padding a normalized image with it equals normalizing a padded image.
BACKGROUND = float(normalize(torch.zeros(1, 1, 1, dtype=torch.uint8)))


def download(root: Path) -> None:
    """Fetch the IDX files with torchvision into ``root/MNIST/raw``."""
    torchvision_download("MNIST", root)


def load_mnist(root: Path, device: torch.device) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Both splits, normalized once, on ``device``."""
    if not root.exists():
        raise UserError(f"--data {str(root)!r} does not exist; pass --download to fetch MNIST there")
    splits = {}
    for split in ("train", "test"):
        images, labels = load_split(root, split)
        splits[split] = (normalize(images).to(device), labels.to(device))
    return splits
