"""ImageNet datasets (torchvision ImageFolder or Caffe LMDB) and their DataLoaders.

ImageFolder layout (default)::

    DATA/train/<class>/*.JPEG   DATA/val/<class>/*.JPEG

Transforms of the final 2017 code's torchvision path: resize to 256x256, random
crop 227 + horizontal flip (training) or centre crop 227 (validation), ToTensor,
then Normalize(mean=(0.485, 0.456, 0.406), std=1/255): the model sees **RGB**
values ``(x - mean) * 255``, roughly -124..131. The Caffe layout
(``--caffe-data``, see :mod:`caffe_lmdb`) gives **BGR** values minus the mean
image, in the same range; a network trained on one layout expects that layout's
channel order.

Training uses a DistributedSampler (padded to equal shares), reshuffled by
``set_epoch`` or, without shuffling (the 2017 Caffe run), in the stored order:
with N processes rank r takes samples r, r + N, ..., so each step's global batch
is the same run of consecutive samples as 2017's single-process batch.
Validation uses :class:`ShardSampler`, which gives every sample to exactly one
rank without padding, so the all-reduced counts of ``evaluate`` are exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Tuple

from PIL import Image, UnidentifiedImageError
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import datasets, transforms

from caffe_lmdb import MEAN_FILE, TRAIN_LMDB, VAL_LMDB, CaffeLMDB, read_mean
from xnornet.cli import UserError
from xnornet.distributed import DistInfo
from xnornet.engine import epoch_seed, train_batch_count

IMAGENET_MEAN = (0.485, 0.456, 0.406)
STD_2017 = (1.0 / 255.0,) * 3  # as the 2017 code had it: Normalize divides by 1/255
ILSVRC_CLASSES = 1000


@dataclass
class ImageNetData:
    train: Dataset
    val: Dataset
    num_classes: int
    description: str


def folder_transform(resize: int, crop: int, train: bool) -> transforms.Compose:
    """The final 2017 code's torchvision pipeline (see module docstring)."""
    steps = [transforms.Resize((resize, resize))]
    steps += [transforms.RandomCrop(crop), transforms.RandomHorizontalFlip()] if train else [transforms.CenterCrop(crop)]
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, STD_2017)]
    return transforms.Compose(steps)


def load_rgb(path: str) -> Image.Image:
    """ImageFolder's loader, with an unreadable file reported as one line."""
    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise UserError(f"cannot read image {path}: {err}") from None


def image_folder(root: Path, split: str, transform: transforms.Compose) -> datasets.ImageFolder:
    folder = root / split
    if not folder.is_dir():
        raise UserError(f"--data {str(root)!r} has no {split!r} folder: expected DATA/train/<class>/*.JPEG and "
                        "DATA/val/<class>/*.JPEG (pass --caffe-data for the Caffe LMDB layout)")
    try:
        return datasets.ImageFolder(str(folder), transform=transform, loader=load_rgb)
    except (FileNotFoundError, OSError) as err:
        raise UserError(f"{folder}: {err}") from None


def load_image_folders(root: Path, resize: int, crop: int, num_classes: Optional[int]) -> ImageNetData:
    if crop > resize:
        raise UserError(f"--input-size {crop} is larger than --resize {resize}")
    train = image_folder(root, "train", folder_transform(resize, crop, train=True))
    val = image_folder(root, "val", folder_transform(resize, crop, train=False))
    if val.classes != train.classes:
        extra = sorted(set(val.classes) ^ set(train.classes))[:3]
        raise UserError(f"{root}/train and {root}/val have different class folders (e.g. {', '.join(extra)})")
    found = len(train.classes)
    if num_classes is not None and num_classes != found:
        raise UserError(f"--num-classes {num_classes}, but {root}/train has {found} class folders")
    return ImageNetData(train, val, found, f"ImageFolder {root}: {len(train)} training, {len(val)} validation "
                                           f"images, {found} classes")


def load_caffe_lmdb(root: Path, crop: int, num_classes: Optional[int]) -> ImageNetData:
    if not root.is_dir():
        raise UserError(f"--data {str(root)!r} is not a folder")
    mean = read_mean(root / MEAN_FILE)
    classes = num_classes if num_classes is not None else ILSVRC_CLASSES
    train = CaffeLMDB(root / TRAIN_LMDB, mean, crop, train=True, num_classes=classes)
    val = CaffeLMDB(root / VAL_LMDB, mean, crop, train=False, num_classes=classes)
    return ImageNetData(train, val, classes, f"Caffe LMDB {root}: {len(train)} training, {len(val)} validation "
                                             f"records, {classes} classes, mean image {tuple(mean.shape)}")


def load_imagenet(root: Path, *, caffe: bool, crop: int, resize: int, num_classes: Optional[int]) -> ImageNetData:
    """Both splits of either layout; ``num_classes`` None = the class folders' count (ImageFolder) or 1000 (LMDB)."""
    if not root.exists():
        raise UserError(f"--data {str(root)!r} does not exist")
    if caffe:
        return load_caffe_lmdb(root, crop, num_classes)
    return load_image_folders(root, resize, crop, num_classes)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...``: each sample on exactly one rank, no padding."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class TrainBatchSampler(BatchSampler):
    """Batches of ``batch_size`` indices of ``sampler``, the last one left out when it holds a
    single sample (BatchNorm cannot train on one): :func:`xnornet.engine.train_batch_count`
    batches, the same on every rank (the DistributedSampler gives each rank as many samples)."""

    def __init__(self, sampler: Sampler[int], batch_size: int) -> None:
        super().__init__(sampler, batch_size, drop_last=False)

    def __iter__(self) -> Iterator[List[int]]:
        for batch in super().__iter__():
            if len(batch) > 1 or self.batch_size == 1:
                yield batch

    def __len__(self) -> int:
        return train_batch_count(len(self.sampler), self.batch_size)


def make_loaders(
    data: ImageNetData, *, batch_size: int, workers: int, seed: int, dist_info: DistInfo, shuffle: bool = True,
    test_batch_size: Optional[int] = None,
) -> Tuple[DataLoader, DistributedSampler, DataLoader]:
    """Training loader (+ its sampler, for ``set_epoch``) and validation loader of one rank.

    ``batch_size`` (and ``test_batch_size``, default ``batch_size``) is per rank. The training
    order depends only on (seed, epoch) with ``shuffle``; without, it is the dataset's own
    order every epoch (module docstring). A last training batch of one sample is left out
    (:class:`TrainBatchSampler`).
    """
    if len(data.val) < dist_info.world_size:
        raise UserError(f"the validation set has {len(data.val)} images, fewer than the {dist_info.world_size} "
                        "processes: every process needs at least one")
    pin = dist_info.device.type == "cuda"
    train_sampler = DistributedSampler(data.train, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                       shuffle=shuffle, seed=seed, drop_last=False)
    train_loader = DataLoader(data.train, batch_sampler=TrainBatchSampler(train_sampler, batch_size),
                              num_workers=workers, pin_memory=pin)
    val_sampler = ShardSampler(len(data.val), dist_info.rank, dist_info.world_size)
    val_loader = DataLoader(data.val, batch_size=test_batch_size or batch_size, sampler=val_sampler,
                            num_workers=workers, pin_memory=pin)
    return train_loader, train_sampler, val_loader


def one_line_worker_errors(batches: Iterable) -> Iterator:
    """Yield from ``batches``; a UserError re-raised from a DataLoader worker (which carries the
    worker's traceback in its message) becomes the original one-line error again."""
    try:
        yield from batches
    except UserError as err:
        last_line = str(err).strip().splitlines()[-1] if str(err).strip() else "data loading failed"
        raise UserError(last_line.split("UserError: ", 1)[-1]) from None


def per_rank_batch_size(batch_size: int, world_size: int, flag: str = "--batch-size") -> int:
    """``-b`` (and ``--test-batch-size``) is the total batch over all processes (as with the 2017 DataParallel)."""
    if batch_size % world_size:
        raise UserError(f"{flag} {batch_size} is not divisible by the {world_size} processes")
    return batch_size // world_size


def rank_epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the global RNG for one epoch of one rank (dropout, augmentation, worker seeds)."""
    return epoch_seed(seed, epoch) * 1_009 + rank
