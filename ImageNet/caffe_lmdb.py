"""The Caffe layout of ImageNet: LMDB databases of ``Datum`` records and a mean image.

    DATA/ilsvrc12_train_lmdb/   DATA/ilsvrc12_val_lmdb/   DATA/imagenet_mean.binaryproto

Read with the ``lmdb`` and ``protobuf`` packages (no Caffe). As in the 2017 code,
an image is a float C x H x W array in **BGR** order, for training flipped
horizontally with probability 1/2, then the mean image (BGR, same H x W, never
flipped) subtracted, then cropped (at random for training, at the centre for
validation). Values are raw pixel units, roughly -128..128. Records are read in
key order (Caffe's ``convert_imageset`` keys start with the record's index, so
this is the order the 2017 code read them in, ``'{:08}'.format(index)``).

Each process opens its own read-only LMDB environment at its first read. The
constructor closes the environment it used for listing the keys, so DataLoader
workers (forked from a process that never read a record) each open their own;
an environment inherited through fork() is never used.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import lmdb
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms

from caffe_proto import BlobProto, Datum, DecodeError
from xnornet.cli import UserError, one_line

TRAIN_LMDB = "ilsvrc12_train_lmdb"
VAL_LMDB = "ilsvrc12_val_lmdb"
MEAN_FILE = "imagenet_mean.binaryproto"


def open_lmdb(path: Path) -> lmdb.Environment:
    """A read-only environment (no lock file, so read-only file systems work)."""
    if not path.exists():
        raise UserError(f"Caffe LMDB {str(path)!r} does not exist (--caffe-data expects DATA/{TRAIN_LMDB} "
                        f"and DATA/{VAL_LMDB}; without --caffe-data, DATA/train and DATA/val image folders)")
    try:
        return lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False,
                         subdir=path.is_dir())
    except lmdb.Error as err:
        raise UserError(f"{str(path)!r} is not an LMDB database ({one_line(str(err), 200)})") from None


def read_mean(path: Path) -> torch.Tensor:
    """The mean image of a Caffe ``BlobProto`` file as a float tensor [3, H, W] (BGR)."""
    if not path.is_file():
        raise UserError(f"Caffe mean file {str(path)!r} not found (--caffe-data expects DATA/{MEAN_FILE}, "
                        "a BlobProto as written by Caffe's compute_image_mean)")
    blob = BlobProto()
    try:
        blob.ParseFromString(path.read_bytes())
    except DecodeError:
        raise UserError(f"Caffe mean file {str(path)!r} is not a BlobProto") from None
    dims = list(blob.shape.dim) if blob.HasField("shape") else [blob.num, blob.channels, blob.height, blob.width]
    values = blob.data if len(blob.data) else blob.double_data
    while len(dims) > 3 and dims[0] == 1:
        dims = dims[1:]
    if len(dims) != 3 or dims[0] != 3 or min(dims) < 1 or len(values) != int(np.prod(dims)):
        raise UserError(f"Caffe mean file {str(path)!r} holds {len(values)} values of shape {dims}; "
                        "expected one 3 x H x W BGR image")
    return torch.tensor(np.asarray(values, dtype=np.float32).reshape(dims))


def decode_datum(value: bytes, where: str) -> Tuple[np.ndarray, int]:
    """A serialized ``Datum`` as (C x H x W BGR array, uint8 or float32; label)."""
    datum = Datum()
    try:
        datum.ParseFromString(value)
    except DecodeError:
        raise UserError(f"{where} is not a Caffe Datum (protobuf decoding failed)") from None
    if datum.encoded:
        try:
            rgb = Image.open(io.BytesIO(datum.data)).convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise UserError(f"{where}: cannot decode its encoded image ({err})") from None
        # Caffe decodes with OpenCV, which gives BGR.
        return np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1].transpose(2, 0, 1)), datum.label
    shape = (datum.channels, datum.height, datum.width)
    expected = int(np.prod(shape))
    if expected <= 0:
        raise UserError(f"{where}: Datum has channels x height x width = {shape}, no image")
    if datum.data:
        if len(datum.data) != expected:
            raise UserError(f"{where}: Datum holds {len(datum.data)} data bytes, but channels x height x width = "
                            f"{shape[0]} x {shape[1]} x {shape[2]} = {expected}")
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape), datum.label
    if len(datum.float_data) == expected:
        return np.asarray(datum.float_data, dtype=np.float32).reshape(shape), datum.label
    raise UserError(f"{where}: Datum holds {len(datum.float_data)} float values and no bytes, "
                    f"expected {expected} (= {shape[0]} x {shape[1]} x {shape[2]})")


def caffe_transform(mean: torch.Tensor, crop: int, train: bool) -> Callable[[np.ndarray], torch.Tensor]:
    """The 2017 pipeline: (training) random horizontal flip of the raw image, subtract the mean
    image, then a random crop (training) or the centre crop (validation).

    The order matters: the mean image is not symmetric, and 2017 subtracted it unflipped from
    the flipped image (``flip(x) - mean``, not ``flip(x - mean)``).
    """
    flip = transforms.RandomHorizontalFlip() if train else None
    cropper = transforms.RandomCrop(crop) if train else transforms.CenterCrop(crop)

    def apply(image: np.ndarray) -> torch.Tensor:
        values = torch.from_numpy(np.asarray(image, dtype=np.float32))
        if flip is not None:
            values = flip(values)
        return cropper(values - mean)

    return apply


class CaffeLMDB(Dataset):
    """Datum records of one LMDB in key order, as (float [3, crop, crop] BGR tensor, label).

    The keys are listed once at construction (keys only, no image data is read)
    and the first record is checked, so a wrong layout fails before training.
    """

    def __init__(self, path: Path, mean: torch.Tensor, crop: int, train: bool, num_classes: int) -> None:
        self.path = Path(path)
        self.mean_shape = tuple(mean.shape)
        if crop > min(self.mean_shape[1:]):
            raise UserError(f"--input-size {crop} is larger than the Caffe images "
                            f"({self.mean_shape[1]}x{self.mean_shape[2]}, the mean file's size)")
        self.crop = crop
        self.num_classes = num_classes
        self.transform = caffe_transform(mean, crop, train)
        with open_lmdb(self.path) as env, env.begin() as txn:
            keys: List[bytes] = list(txn.cursor().iternext(keys=True, values=False))
        if not keys:
            raise UserError(f"Caffe LMDB {str(self.path)!r} holds no records")
        # One bytes blob plus offsets: workers share it copy-on-write without touching refcounts per key.
        self._key_blob = b"".join(keys)
        self._key_ends = np.cumsum([len(key) for key in keys], dtype=np.int64)
        self._env: Optional[lmdb.Environment] = None
        self.opened_in_pid: Optional[int] = None  # the process that opened self._env
        self[0]  # fail early on a wrong record size, a mean of another size, a bad label
        self.close()

    def __len__(self) -> int:
        return len(self._key_ends)

    def key(self, index: int) -> bytes:
        start = int(self._key_ends[index - 1]) if index > 0 else 0
        return self._key_blob[start:int(self._key_ends[index])]

    def _environment(self) -> lmdb.Environment:
        if self._env is not None and self.opened_in_pid != os.getpid():
            # LMDB forbids using an environment across fork(), and py-lmdb refuses to open
            # the same files again in a child that inherited an open environment.
            raise RuntimeError(f"the LMDB environment of {self.path} was open in process {self.opened_in_pid} "
                               "when it forked: call close() before starting DataLoader workers")
        if self._env is None:
            self._env = open_lmdb(self.path)
            self.opened_in_pid = os.getpid()
        return self._env

    def close(self) -> None:
        if self._env is not None and self.opened_in_pid == os.getpid():
            self._env.close()
        self._env = None
        self.opened_in_pid = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_env"], state["opened_in_pid"] = None, None
        return state

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        key = self.key(index)
        where = f"record {key.decode(errors='replace')!r} of {self.path}"
        with self._environment().begin() as txn:
            value = txn.get(key)
        if value is None:
            raise UserError(f"{where} vanished: was the LMDB changed while reading?")
        image, label = decode_datum(value, where)
        if tuple(image.shape) != self.mean_shape:
            raise UserError(f"{where} is a {'x'.join(map(str, image.shape))} image, but the mean file is "
                            f"{'x'.join(map(str, self.mean_shape))}: they must match (channels x height x width)")
        if not 0 <= label < self.num_classes:
            raise UserError(f"{where} has label {label}, outside 0..{self.num_classes - 1} (set --num-classes)")
        return self.transform(image), label
