"""ImageNet recipe data: Caffe wire format, LMDB reading, transforms (in the 2017 order), samplers
(shuffled or in stored order), bad input. In-process."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from imagenet_fixtures import (  # also puts ImageNet/ on sys.path
    CROP,
    SIZE,
    class_image,
    datum_bytes,
    make_caffe_lmdb,
    make_image_folder,
    write_lmdb,
    write_mean,
)

from caffe_lmdb import CaffeLMDB, decode_datum, read_mean  # noqa: E402  (recipe-local)
from caffe_proto import BlobProto, Datum  # noqa: E402
from imagenet_data import (  # noqa: E402
    IMAGENET_MEAN,
    ShardSampler,
    load_imagenet,
    make_loaders,
    one_line_worker_errors,
)
from xnornet.cli import UserError
from xnornet.distributed import DistInfo


def test_datum_wire_format_uses_caffe_field_numbers() -> None:
    datum = Datum(channels=3, height=2, width=1, data=b"abcdef", label=7, encoded=True)
    datum.float_data.append(1.0)
    one = struct.pack("<f", 1.0)
    # tag = field_number << 3 | wire type (0 varint, 2 length-delimited, 5 fixed32)
    assert datum.SerializeToString() == (b"\x08\x03" b"\x10\x02" b"\x18\x01" b"\x22\x06abcdef" b"\x28\x07"
                                         b"\x35" + one + b"\x38\x01")
    assert Datum.FromString(b"\x28\x05").label == 5 and not Datum().encoded


def test_blobproto_wire_format_uses_caffe_field_numbers() -> None:
    blob = BlobProto(num=1, channels=3, height=2, width=4)
    blob.shape.dim.extend([1, 3])
    blob.data.extend([1.0, 1.0])
    blob.double_data.append(2.0)
    expected = (b"\x08\x01" b"\x10\x03" b"\x18\x02" b"\x20\x04"
                b"\x2a\x08" + struct.pack("<2f", 1.0, 1.0)      # data = 5, packed floats
                + b"\x3a\x04\x0a\x02\x01\x03"                  # shape = 7 { dim = 1, packed }
                + b"\x42\x08" + struct.pack("<d", 2.0))        # double_data = 8, packed
    assert blob.SerializeToString() == expected


def test_datum_decodes_to_bgr_chw_raw_and_encoded() -> None:
    rgb = class_image(0, 0)  # mean colour R 60, G 200, B 90
    raw, label = decode_datum(datum_bytes(rgb, 4), "raw")
    assert label == 4 and raw.shape == (3, SIZE, SIZE) and raw.dtype == np.uint8
    assert np.array_equal(raw[0], rgb[:, :, 2]) and np.array_equal(raw[2], rgb[:, :, 0])  # B first, R last
    decoded, _ = decode_datum(datum_bytes(rgb, 4, encoded=True), "jpeg")
    assert decoded.shape == raw.shape
    channel_means = decoded.reshape(3, -1).mean(axis=1)
    assert np.allclose(channel_means, raw.reshape(3, -1).mean(axis=1), atol=3)  # BGR too, JPEG loss only
    floats = Datum(channels=1, height=1, width=2, float_data=[0.5, -1.0]).SerializeToString()
    assert decode_datum(floats, "f")[0].tolist() == [[[0.5, -1.0]]]


def test_mean_file_round_trip_with_legacy_dims_and_shape(tmp_path: Path) -> None:
    mean = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    write_mean(tmp_path / "legacy.binaryproto", mean)
    assert torch.equal(read_mean(tmp_path / "legacy.binaryproto"), torch.from_numpy(mean))
    blob = BlobProto()
    blob.shape.dim.extend([1, 3, 4, 5])
    blob.double_data.extend(mean.astype(np.float64).ravel().tolist())
    (tmp_path / "shaped.binaryproto").write_bytes(blob.SerializeToString())
    assert torch.equal(read_mean(tmp_path / "shaped.binaryproto"), torch.from_numpy(mean))


def test_lmdb_records_are_bgr_minus_mean_centre_cropped(tmp_path: Path) -> None:
    root = make_caffe_lmdb(tmp_path / "caffe")
    mean = read_mean(root / "imagenet_mean.binaryproto")
    val = CaffeLMDB(root / "ilsvrc12_val_lmdb", mean, CROP, train=False, num_classes=3)
    assert len(val) == 6
    image, label = val[0]  # record 0: label 0, raw bytes
    rgb = class_image(0, 500)
    bgr = torch.from_numpy(np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1))).float()
    top = left = int(round((SIZE - CROP) / 2))
    expected = (bgr - mean)[:, top:top + CROP, left:left + CROP]
    assert label == 0 and image.shape == (3, CROP, CROP)
    assert torch.allclose(image, expected)
    train = CaffeLMDB(root / "ilsvrc12_train_lmdb", mean, CROP, train=True, num_classes=3)
    crops = {tuple(train[0][0][0, 0, :3].tolist()) for _ in range(12)}
    assert len(crops) > 1  # random crop / flip


def test_caffe_training_records_are_flipped_then_mean_subtracted_then_cropped(tmp_path: Path) -> None:
    """The 2017 order: flip the raw image, subtract the (unflipped) mean image, crop. With a mean
    image that is not symmetric, flip(x) - mean differs from flip(x - mean), the other order."""
    root = tmp_path / "caffe"
    root.mkdir()
    rgb = class_image(1, 0)
    write_lmdb(root / "ilsvrc12_train_lmdb", [datum_bytes(rgb, 1)])
    ramp = np.linspace(0.0, 90.0, SIZE, dtype=np.float32)  # grows left to right
    write_mean(root / "imagenet_mean.binaryproto", np.broadcast_to(ramp, (3, SIZE, SIZE)).copy())
    mean = read_mean(root / "imagenet_mean.binaryproto")
    bgr = torch.from_numpy(np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1))).float()
    plain, flipped = bgr - mean, bgr.flip(2) - mean
    assert not torch.allclose(flipped, (bgr - mean).flip(2), atol=1.0)  # the two orders differ here
    torch.manual_seed(0)
    for crop in (SIZE, CROP):  # the full image (no crop), then random 67x67 windows
        dataset = CaffeLMDB(root / "ilsvrc12_train_lmdb", mean, crop, train=True, num_classes=3)
        seen = set()
        for _ in range(24):
            image, label = dataset[0]
            assert label == 1 and image.shape == (3, crop, crop)
            offsets = range(SIZE - crop + 1)
            matches = {name for name, full in (("plain", plain), ("flipped", flipped))
                       for top in offsets for left in offsets
                       if torch.equal(image, full[:, top:top + crop, left:left + crop])}
            assert len(matches) == 1, matches
            seen |= matches
        dataset.close()
        assert seen == {"plain", "flipped"}


@pytest.mark.parametrize("world_size", [1, 2])
def test_training_order_is_the_stored_one_without_shuffle(tmp_path: Path, world_size: int) -> None:
    """Without shuffling (the 2017 Caffe run) every epoch reads the records in LMDB key order; with
    several processes each global step holds the same consecutive records as one process would."""
    root = make_caffe_lmdb(tmp_path / "caffe")  # 12 training records, labels 0, 1, 2, 0, 1, 2, ...
    data = load_imagenet(root, caffe=True, crop=CROP, resize=SIZE, num_classes=3)
    per_rank = 6 // world_size
    orders = {}
    for shuffle in (False, True):
        for rank in range(world_size):
            dist_info = DistInfo(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"))
            loader, sampler, _ = make_loaders(data, batch_size=per_rank, workers=0, seed=1, dist_info=dist_info,
                                              shuffle=shuffle)
            for epoch in (1, 2):
                sampler.set_epoch(epoch)
                orders[shuffle, rank, epoch] = list(sampler)
                if not shuffle:
                    labels = torch.cat([batch_labels for _, batch_labels in loader]).tolist()
                    assert labels == [index % 3 for index in orders[shuffle, rank, epoch]]
    for rank in range(world_size):
        for epoch in (1, 2):
            assert orders[False, rank, epoch] == list(range(rank, 12, world_size))
    for step in range(12 // (world_size * per_rank)):  # the global batch of each step
        records = sorted(i for rank in range(world_size)
                         for i in orders[False, rank, 1][step * per_rank:(step + 1) * per_rank])
        assert records == list(range(step * 6, step * 6 + 6))
    assert orders[True, 0, 1] != orders[True, 0, 2]  # reshuffled every epoch
    assert sorted(i for rank in range(world_size) for i in orders[True, rank, 1]) == list(range(12))


@pytest.mark.parametrize("world_size, per_rank, sizes", [
    (1, 4, [4, 4, 2]),     # 10 records: the last batch of 2 is kept
    (1, 3, [3, 3, 3]),     # 10 = 3 + 3 + 3 + 1: the single last record is left out
    (2, 2, [2, 2]),        # 5 records per rank: 2 + 2 + 1, the 1 left out on both ranks
    (2, 5, [5]),
])
def test_no_training_batch_holds_a_single_sample(tmp_path: Path, world_size: int, per_rank: int,
                                                 sizes: list) -> None:
    """BatchNorm cannot train on one sample: a last training batch of one is left out (on every
    rank alike, so that the ranks step together), and len(loader), the recipe's batches per
    epoch, is the number of batches read; validation keeps every image."""
    root = make_caffe_lmdb(tmp_path / "caffe", classes=2, train_per_class=5, val_per_class=1)  # 10 training
    data = load_imagenet(root, caffe=True, crop=CROP, resize=SIZE, num_classes=2)
    for rank in range(world_size):
        dist_info = DistInfo(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"))
        loader, sampler, val_loader = make_loaders(data, batch_size=per_rank, workers=0, seed=1,
                                                   dist_info=dist_info, shuffle=True)
        for epoch in (1, 2):
            sampler.set_epoch(epoch)
            assert [len(labels) for _, labels in loader] == sizes and len(loader) == len(sizes)
        assert sum(len(labels) for _, labels in val_loader) == len(range(rank, 2, world_size))


def test_image_folder_values_are_rgb_minus_mean_times_255(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "folder", classes=2, train_per_class=1, val_per_class=1)
    flat = np.full((SIZE, SIZE, 3), (200, 100, 50), dtype=np.uint8)
    from PIL import Image

    Image.fromarray(flat).save(root / "val" / "n00000000" / "val_0_0.JPEG", quality=100)
    data = load_imagenet(root, caffe=False, crop=CROP, resize=SIZE, num_classes=None)
    assert data.num_classes == 2 and len(data.train) == 2 and len(data.val) == 2
    image, label = data.val[0]
    assert label == 0 and image.shape == (3, CROP, CROP)
    for channel, value in enumerate((200, 100, 50)):  # RGB order, (x / 255 - mean) * 255
        assert image[channel].mean().item() == pytest.approx(value - 255 * IMAGENET_MEAN[channel], abs=1.5)


def test_shard_sampler_splits_exactly_without_padding() -> None:
    shards = [list(ShardSampler(7, rank, 3)) for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))
    assert [len(ShardSampler(7, rank, 3)) for rank in range(3)] == [3, 2, 2]


class PidProbe(Dataset):
    """Which process read each record, and which process had opened the LMDB it was read from."""

    def __init__(self, lmdb_dataset: CaffeLMDB) -> None:
        self.lmdb_dataset = lmdb_dataset

    def __len__(self) -> int:
        return len(self.lmdb_dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        self.lmdb_dataset[index]
        return torch.tensor([os.getpid(), self.lmdb_dataset.opened_in_pid])


def test_each_worker_opens_its_own_lmdb_environment(tmp_path: Path) -> None:
    root = make_caffe_lmdb(tmp_path / "caffe")
    mean = read_mean(root / "imagenet_mean.binaryproto")
    dataset = CaffeLMDB(root / "ilsvrc12_train_lmdb", mean, CROP, train=True, num_classes=3)
    assert dataset.opened_in_pid is None  # the constructor read record 0, then closed its environment
    loader = DataLoader(PidProbe(dataset), batch_size=1, num_workers=2)
    pids = torch.cat(list(loader))
    readers, openers = pids[:, 0], pids[:, 1]
    assert torch.equal(readers, openers)
    assert len(set(readers.tolist())) == 2 and os.getpid() not in readers.tolist()
    # In this process (as with --workers 0) the dataset opens its own environment; forking then is refused.
    dataset[0]
    assert dataset.opened_in_pid == os.getpid()
    with pytest.raises(Exception, match="open in process .* when it forked"):
        list(DataLoader(dataset, batch_size=1, num_workers=1))
    dataset.close()


def test_worker_user_error_becomes_one_line_again(tmp_path: Path) -> None:
    root = make_caffe_lmdb(tmp_path / "caffe", bad_last_train=Datum(
        channels=3, height=SIZE, width=SIZE, data=b"\0" * 100, label=0).SerializeToString())
    mean = read_mean(root / "imagenet_mean.binaryproto")
    dataset = CaffeLMDB(root / "ilsvrc12_train_lmdb", mean, CROP, train=True, num_classes=3)
    loader = DataLoader(dataset, batch_size=4, num_workers=2)
    with pytest.raises(UserError) as caught:
        list(one_line_worker_errors(loader))
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("record '00000011'") and "100 data bytes" in message and "15552" in message


# Bad input: one clear line each (UserError; run_cli turns it into one stderr line and exit 1).

def test_missing_split_folder(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "folder", classes=2, train_per_class=1, val_per_class=1)
    for child in (root / "val").iterdir():
        for image in child.iterdir():
            image.unlink()
        child.rmdir()
    (root / "val").rmdir()
    with pytest.raises(UserError, match="has no 'val' folder"):
        load_imagenet(root, caffe=False, crop=CROP, resize=SIZE, num_classes=None)


def test_lmdb_path_that_is_not_an_lmdb(tmp_path: Path) -> None:
    root = make_caffe_lmdb(tmp_path / "caffe")
    (root / "ilsvrc12_val_lmdb" / "data.mdb").write_bytes(b"not an lmdb" * 1000)
    with pytest.raises(UserError, match="is not an LMDB database"):
        load_imagenet(root, caffe=True, crop=CROP, resize=SIZE, num_classes=3)


def test_datum_with_wrong_byte_count_fails_before_training(tmp_path: Path) -> None:
    root = make_caffe_lmdb(tmp_path / "caffe")
    bad = Datum(channels=3, height=SIZE, width=SIZE, data=b"\0" * (3 * SIZE * SIZE - 1), label=1)
    write_lmdb(root / "ilsvrc12_val_lmdb", [bad.SerializeToString()])  # overwrites record 00000000
    with pytest.raises(UserError, match=r"15551 data bytes, but channels x height x width = 3 x 72 x 72 = 15552"):
        load_imagenet(root, caffe=True, crop=CROP, resize=SIZE, num_classes=3)


def test_missing_mean_file(tmp_path: Path) -> None:
    root = make_caffe_lmdb(tmp_path / "caffe")
    (root / "imagenet_mean.binaryproto").unlink()
    with pytest.raises(UserError, match="mean file .* not found"):
        load_imagenet(root, caffe=True, crop=CROP, resize=SIZE, num_classes=3)


def test_label_outside_num_classes(tmp_path: Path) -> None:
    root = make_caffe_lmdb(tmp_path / "caffe")
    with pytest.raises(UserError, match="label 2, outside 0..1"):
        load_imagenet(root, caffe=True, crop=CROP, resize=SIZE, num_classes=2).train[2]
