"""Write CIFAR-10 arrays in each of the three layouts that ``cifar_data`` reads.

Used by ``verify_data.py`` (converting the real binary version) and by the
tests (tiny synthetic data sets). Images are ``[N, 3, 32, 32]``, labels ``[N]``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Sequence

import numpy as np

from cifar_data import PIXELS, TEST_BATCH, TRAIN_BATCHES


def _split(images: np.ndarray, labels: np.ndarray, parts: int) -> Sequence[tuple]:
    bounds = np.linspace(0, len(labels), parts + 1).astype(int)
    return [(images[a:b], labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def write_bin_layout(root: Path, train: tuple, test: tuple) -> Path:
    """``root/cifar-10-batches-bin/data_batch_1..5.bin, test_batch.bin``; returns that folder."""
    folder = Path(root) / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    names = TRAIN_BATCHES + [TEST_BATCH]
    for name, (images, labels) in zip(names, list(_split(*train, len(TRAIN_BATCHES))) + [test]):
        records = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(-1, PIXELS)], axis=1)
        records.astype(np.uint8).tofile(folder / f"{name}.bin")
    return folder


def write_py_layout(root: Path, train: tuple, test: tuple) -> Path:
    """``root/cifar-10-batches-py/data_batch_1..5, test_batch`` as pickled dicts, the official fields."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = TRAIN_BATCHES + [TEST_BATCH]
    for index, (name, (images, labels)) in enumerate(
        zip(names, list(_split(*train, len(TRAIN_BATCHES))) + [test])
    ):
        batch = {
            "batch_label": f"{'testing' if name == TEST_BATCH else 'training'} batch {index % 5 + 1} of 5",
            "labels": [int(v) for v in labels],
            "data": np.ascontiguousarray(images.reshape(-1, PIXELS), dtype=np.uint8),
            "filenames": [f"image_{i}.png" for i in range(len(labels))],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
    return folder


def write_npy_layout(root: Path, train: tuple, test: tuple, suffix: bool = False) -> Path:
    """``root/train_data, train_labels, test_data, test_labels`` (``.npy`` appended if ``suffix``)."""
    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in (("train", train), ("test", test)):
        for name, array in ((f"{split}_data", images.astype(np.float32)), (f"{split}_labels", labels)):
            with open(folder / (name + (".npy" if suffix else "")), "wb") as handle:
                np.save(handle, array, allow_pickle=False)
    return folder
