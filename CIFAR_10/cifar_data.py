"""CIFAR-10 from any of its three on-disk layouts, as numpy arrays.

Layouts (``--data-format``; ``auto`` takes the first one found, in this order):

- ``npy``: the 2017 preprocessed arrays ``train_data``, ``train_labels``,
  ``test_data``, ``test_labels`` in ``--data`` (numpy ``.npy`` files, with or
  without the suffix). The images are already GCN+ZCA whitened (float,
  ``N x 3 x 32 x 32`` or ``N x 3072``).
- ``py``: torchvision's "python version", ``cifar-10-batches-py/data_batch_1..5``
  and ``test_batch`` (pickled dicts; what ``--download`` fetches).
- ``bin``: the official "binary version", ``cifar-10-batches-bin/data_batch_1..5.bin``
  and ``test_batch.bin``: records of 1 label byte + 1024 R, 1024 G, 1024 B bytes.

The ``py`` and ``bin`` folders may also be given directly as ``--data``.
Nothing is ever written to the data folder (``--download`` aside).
"""

from __future__ import annotations

import importlib
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from xnornet.cli import UserError, one_line
from xnornet.download import torchvision_download

LOG = logging.getLogger("xnornet")

NUM_CLASSES = 10
CHANNELS, SIZE = 3, 32
PIXELS = CHANNELS * SIZE * SIZE  # 3072 bytes per image: the R, G and B planes, row-major
RECORD_BYTES = 1 + PIXELS  # binary version: one label byte, then the pixels

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
NPY_NAMES = ("train_data", "train_labels", "test_data", "test_labels")
FORMATS = ("auto", "npy", "py", "bin")

LAYOUT_HELP = (
    "accepted layouts: (1) cifar-10-batches-py/data_batch_1..5 + test_batch (torchvision's python version, "
    "--download fetches it), (2) cifar-10-batches-bin/data_batch_1..5.bin + test_batch.bin (the binary version), "
    "(3) train_data, train_labels, test_data, test_labels, .npy suffix optional (the 2017 GCN+ZCA arrays)"
)


@dataclass
class RawCifar:
    """Both splits as read from disk.

    Images are ``[N, 3, 32, 32]``: uint8 pixels for ``py``/``bin``, float32
    already-whitened values for ``npy`` (``preprocessed`` is True then).
    Labels are int64 ``[N]`` in 0..9.
    """

    layout: str
    folder: Path
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def preprocessed(self) -> bool:
        return self.layout == "npy"


# --------------------------------------------------------------------- locating


def _folders(root: Path, layout: str) -> List[Path]:
    """Where a layout's files may lie under ``--data``."""
    if layout == "npy":
        return [root]
    return [root / f"cifar-10-batches-{layout}", root]


def _marker(layout: str) -> str:
    """The first file a layout needs: finding it decides the layout."""
    return {"npy": "train_data", "py": TRAIN_BATCHES[0], "bin": TRAIN_BATCHES[0] + ".bin"}[layout]


def _npy_path(folder: Path, name: str) -> Optional[Path]:
    for candidate in (folder / name, folder / f"{name}.npy"):
        if candidate.is_file():
            return candidate
    return None


def _has_marker(folder: Path, layout: str) -> bool:
    if layout == "npy":
        return _npy_path(folder, _marker(layout)) is not None
    return (folder / _marker(layout)).is_file()


def locate(root: Path, data_format: str = "auto") -> Tuple[str, Path]:
    """The layout and folder of the CIFAR-10 data under ``root``."""
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise UserError(f"--data {str(root)!r} {what}; {LAYOUT_HELP}")
    layouts = ("npy", "py", "bin") if data_format == "auto" else (data_format,)
    for layout in layouts:
        for folder in _folders(root, layout):
            if _has_marker(folder, layout):
                return layout, folder
    if data_format == "auto":
        raise UserError(f"no CIFAR-10 data under --data {str(root)!r}; {LAYOUT_HELP}")
    places = " or ".join(str(folder) for folder in _folders(root, data_format))
    suffix = " (or train_data.npy)" if data_format == "npy" else ""
    raise UserError(
        f"--data-format {data_format}: {_marker(data_format)!r}{suffix} not found in {places}; {LAYOUT_HELP}"
    )


def _require(path: Optional[Path], folder: Path, name: str, layout: str) -> Path:
    if path is None or not path.is_file():
        raise UserError(f"CIFAR-10 file {str(folder / name)!r} is missing from the {layout} layout; {LAYOUT_HELP}")
    return path


def _check_labels(labels: np.ndarray, count: int, source: str) -> np.ndarray:
    if labels.shape != (count,):
        raise UserError(f"{source}: labels have shape {labels.shape}, expected ({count},) to match the images")
    bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if bad.size:
        raise UserError(f"{source}: label {int(bad[0])} out of range 0-{NUM_CLASSES - 1}")
    return labels.astype(np.int64)


# ----------------------------------------------------------------------- binary


def read_bin_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """One binary-version file: uint8 images [N, 3, 32, 32] and int64 labels [N]."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD_BYTES:
        raise UserError(
            f"{path} is not a CIFAR-10 binary batch: {raw.size} bytes is not a whole number of "
            f"{RECORD_BYTES}-byte records (1 label byte + {PIXELS} pixel bytes); {LAYOUT_HELP}"
        )
    records = raw.reshape(-1, RECORD_BYTES)
    labels = _check_labels(records[:, 0], records.shape[0], str(path))
    images = records[:, 1:].reshape(-1, CHANNELS, SIZE, SIZE).copy()
    return images, labels


# ----------------------------------------------------------------------- python


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles the python-version batches and nothing else.

    The python version of CIFAR-10 is distributed as pickled dicts, so pickle is
    the only way to read it; to keep a tampered file from running code, only
    what a dict of numpy arrays, lists, strings and numbers needs is allowed.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "numpy.core.multiarray"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "numpy.core.multiarray"),
        ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "numpy.core.numeric"),
        ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "numpy.core.numeric"),
        ("numpy", "ndarray"): ("numpy",),
        ("numpy", "dtype"): ("numpy",),
        ("_codecs", "encode"): ("_codecs",),  # how Python 3 writes bytes at pickle protocol 2
    }

    def find_class(self, module: str, name: str) -> Any:
        modules = self.ALLOWED.get((module, name))
        if modules is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of a CIFAR-10 batch)")
        for candidate in modules:
            try:
                return getattr(importlib.import_module(candidate), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"cannot resolve {module}.{name}")


def _entry(batch: Dict[Any, Any], key: str) -> Any:
    """``batch[key]``: Python 3 files have str keys, Python 2 ones loaded as bytes may have bytes keys."""
    for candidate in (key, key.encode()):
        if candidate in batch:
            return batch[candidate]
    raise KeyError(key)


def read_py_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """One python-version file: uint8 images [N, 3, 32, 32] and int64 labels [N]."""
    try:
        with open(path, "rb") as handle:
            # latin1 decodes the Python 2 strings of the official files (as torchvision does).
            batch = _BatchUnpickler(handle, encoding="latin1").load()
        data = np.asarray(_entry(batch, "data"))
        labels = np.asarray(_entry(batch, "labels"))
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise UserError(f"{path} is not a CIFAR-10 python batch ({one_line(str(err), 200)}); {LAYOUT_HELP}") from None
    except KeyError as err:
        raise UserError(f"{path} is not a CIFAR-10 python batch (no {err} entry); {LAYOUT_HELP}") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        raise UserError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, {PIXELS}); {LAYOUT_HELP}")
    labels = _check_labels(labels, data.shape[0], str(path))
    return data.reshape(-1, CHANNELS, SIZE, SIZE).copy(), labels


# -------------------------------------------------------------------- 2017 npy


def read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise UserError(f"{path} is not a readable numpy array file ({one_line(str(err), 200)}); {LAYOUT_HELP}") from None


def read_npy_split(folder: Path, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """The 2017 arrays of ``split``: float32 images [N, 3, 32, 32] and int64 labels [N]."""
    data_path = _require(_npy_path(folder, f"{split}_data"), folder, f"{split}_data", "npy")
    labels_path = _require(_npy_path(folder, f"{split}_labels"), folder, f"{split}_labels", "npy")
    data, labels = read_npy(data_path), read_npy(labels_path)
    if data.dtype.kind not in "fiu" or data.shape[1:] not in ((PIXELS,), (CHANNELS, SIZE, SIZE)):
        raise UserError(
            f"{data_path}: array is {data.dtype} {data.shape}, expected numbers shaped (N, 3, 32, 32) or (N, 3072)"
        )
    if labels.dtype.kind not in "iu" and not (labels.dtype.kind == "f" and np.all(labels == np.round(labels))):
        raise UserError(f"{labels_path}: labels are {labels.dtype}, expected integers 0-9")
    labels = _check_labels(labels.reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels,
                           data.shape[0], str(labels_path))
    images = data.reshape(-1, CHANNELS, SIZE, SIZE).astype(np.float32)
    if not np.isfinite(images).all():
        raise UserError(f"{data_path}: the images hold NaN or infinite values")
    return images, labels


# ---------------------------------------------------------------------- loading


def _read_batches(folder: Path, layout: str, names: List[str]) -> Tuple[np.ndarray, np.ndarray]:
    reader: Callable[[Path], Tuple[np.ndarray, np.ndarray]] = read_py_batch if layout == "py" else read_bin_batch
    parts = []
    for name in names:
        file_name = name + (".bin" if layout == "bin" else "")
        parts.append(reader(_require(folder / file_name, folder, file_name, layout)))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def load_cifar10(root: Path, data_format: str = "auto") -> RawCifar:
    """Read both splits of the layout found under ``root`` (see the module docstring)."""
    layout, folder = locate(Path(root), data_format)
    if layout == "npy":
        train, test = read_npy_split(folder, "train"), read_npy_split(folder, "test")
    else:
        train = _read_batches(folder, layout, TRAIN_BATCHES)
        test = _read_batches(folder, layout, [TEST_BATCH])
    return RawCifar(layout, folder, train[0], train[1], test[0], test[1])


def download(root: Path) -> None:
    """Fetch the python version with torchvision into ``root/cifar-10-batches-py``."""
    torchvision_download("CIFAR10", root)
