"""Synthetic ImageNet data for the ImageNet recipe tests: tiny image folders and Caffe LMDBs.

Images are 72x72 (the recipe runs them with --resize 72 --input-size 67, the
smallest AlexNet input). Each class has its own mean colour plus noise.
"""

from __future__ import annotations

import importlib.util
import io
import sys
from types import ModuleType
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import lmdb
import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "ImageNet"))

from caffe_proto import BlobProto, Datum  # noqa: E402  (recipe-local module)

SIZE = 72
CROP = 67
RECIPE_MODULE = "imagenet_main"
SMALL_ARGS = ["--input-size", CROP, "--resize", SIZE, "--hidden-features", 32, "--workers", 0,
              "--batch-size", 4, "--print-freq", 1]


def class_image(label: int, index: int, size: int = SIZE) -> np.ndarray:
    """An RGB uint8 image [size, size, 3] whose colour depends on the class."""
    rng = np.random.default_rng(1000 * label + index)
    base = np.array([(60 + 80 * label) % 256, (200 - 50 * label) % 256, (30 * label + 90) % 256], dtype=np.float64)
    noise = rng.normal(0.0, 20.0, size=(size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def make_image_folder(root: Path, classes: int = 3, train_per_class: int = 4, val_per_class: int = 2) -> Path:
    """root/train/<class>/*.JPEG and root/val/<class>/*.JPEG."""
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                image = class_image(label, index + (0 if split == "train" else 500))
                Image.fromarray(image).save(folder / f"{split}_{label}_{index}.JPEG", quality=90)
    return root


def datum_bytes(image_rgb: np.ndarray, label: int, encoded: bool = False) -> bytes:
    """A serialized Caffe Datum: raw C x H x W BGR bytes, or an encoded JPEG."""
    height, width, channels = image_rgb.shape
    if encoded:
        buffer = io.BytesIO()
        Image.fromarray(image_rgb).save(buffer, format="JPEG", quality=95)
        return Datum(data=buffer.getvalue(), label=label, encoded=True).SerializeToString()
    bgr_chw = np.ascontiguousarray(image_rgb[:, :, ::-1].transpose(2, 0, 1))
    return Datum(channels=channels, height=height, width=width, data=bgr_chw.tobytes(),
                 label=label).SerializeToString()


def write_lmdb(path: Path, values: Iterable[bytes]) -> None:
    """Records under Caffe-style keys 00000000, 00000001, ..."""
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for index, value in enumerate(values):
            txn.put(f"{index:08d}".encode(), value)
    env.close()


def write_mean(path: Path, mean_bgr_chw: np.ndarray) -> None:
    blob = BlobProto(num=1, channels=mean_bgr_chw.shape[0], height=mean_bgr_chw.shape[1],
                     width=mean_bgr_chw.shape[2])
    blob.data.extend(mean_bgr_chw.astype(np.float32).ravel().tolist())
    path.write_bytes(blob.SerializeToString())


def make_caffe_lmdb(root: Path, classes: int = 3, train_per_class: int = 4, val_per_class: int = 2,
                    bad_last_train: Optional[bytes] = None) -> Path:
    """root/ilsvrc12_{train,val}_lmdb and root/imagenet_mean.binaryproto; every third record is
    an encoded JPEG. ``bad_last_train`` replaces the last training record."""
    root.mkdir(parents=True, exist_ok=True)
    splits: List[Tuple[str, int, int]] = [("ilsvrc12_train_lmdb", train_per_class, 0),
                                          ("ilsvrc12_val_lmdb", val_per_class, 500)]
    total = np.zeros((3, SIZE, SIZE))
    count = 0
    for name, per_class, offset in splits:
        values = []
        for index in range(per_class):
            for label in range(classes):
                image = class_image(label, index + offset)
                values.append(datum_bytes(image, label, encoded=len(values) % 3 == 2))
                total += image[:, :, ::-1].transpose(2, 0, 1)
                count += 1
        if name.startswith("ilsvrc12_train") and bad_last_train is not None:
            values[-1] = bad_last_train
        write_lmdb(root / name, values)
    write_mean(root / "imagenet_mean.binaryproto", total / count)
    return root


def recipe_main() -> ModuleType:
    """ImageNet/main.py imported under a unique module name (other recipes also have a main.py)."""
    if RECIPE_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(RECIPE_MODULE, REPO_ROOT / "ImageNet" / "main.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[RECIPE_MODULE] = module
        spec.loader.exec_module(module)
    return sys.modules[RECIPE_MODULE]


def run_in_process(argv: Sequence[Any]) -> dict:
    """The recipe's main(args) in this process (raises UserError on bad input)."""
    recipe = recipe_main()
    return recipe.main(recipe.get_args_parser().parse_args([str(a) for a in argv]))
