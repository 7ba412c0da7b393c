"""CIFAR-10 readers: the three layouts agree, detection, and one-line errors for bad data."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "CIFAR_10"))

from conftest import assert_one_line_error, run_script  # noqa: E402
from cifar_data import LAYOUT_HELP, load_cifar10  # noqa: E402
from cifar_write import write_bin_layout, write_npy_layout, write_py_layout  # noqa: E402
from xnornet.cli import UserError  # noqa: E402

LAYOUT_NAMES = ("cifar-10-batches-py", "cifar-10-batches-bin", "train_data, train_labels, test_data, test_labels")


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    train = (rng.integers(0, 256, (64, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 64))
    test = (rng.integers(0, 256, (32, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 32))
    return train, test


def assert_names_layouts(message: str) -> None:
    for name in LAYOUT_NAMES:
        assert name in message, message


@pytest.mark.parametrize("layout", ["bin", "py", "npy", "npy_suffix"])
def test_every_layout_reads_the_same_images(tmp_path, arrays, layout):
    train, test = arrays
    if layout == "bin":
        write_bin_layout(tmp_path, train, test)
    elif layout == "py":
        write_py_layout(tmp_path, train, test)
    else:
        write_npy_layout(tmp_path, train, test, suffix=layout == "npy_suffix")
    raw = load_cifar10(tmp_path)
    assert raw.layout == layout.split("_")[0]
    expected_dtype = np.float32 if raw.layout == "npy" else np.uint8
    assert raw.train_images.dtype == expected_dtype and raw.train_images.shape == (64, 3, 32, 32)
    assert np.array_equal(raw.train_images, train[0].astype(expected_dtype))
    assert np.array_equal(raw.test_images, test[0].astype(expected_dtype))
    assert np.array_equal(raw.train_labels, train[1]) and raw.train_labels.dtype == np.int64
    assert np.array_equal(raw.test_labels, test[1])


def test_binary_records_are_label_then_rgb_planes(tmp_path):
    record = np.zeros(3073, np.uint8)
    record[0] = 7
    record[1 + 5] = 11  # R plane, row 0, column 5
    record[1 + 1024 + 32 * 2 + 3] = 22  # G plane, row 2, column 3
    record[1 + 2048 + 32 * 31 + 31] = 33  # B plane, last pixel
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        record.tofile(folder / f"{name}.bin")
    raw = load_cifar10(tmp_path, "bin")
    image = raw.train_images[0]
    assert raw.train_labels[0] == 7 and image[0, 0, 5] == 11 and image[1, 2, 3] == 22 and image[2, 31, 31] == 33
    assert int(image.sum()) == 66


def test_detection_order_and_forced_format(tmp_path, arrays):
    train, test = arrays
    write_bin_layout(tmp_path, train, test)
    write_py_layout(tmp_path, train, test)
    assert load_cifar10(tmp_path).layout == "py"  # py before bin
    assert load_cifar10(tmp_path, "bin").layout == "bin"
    # The batches folder itself may be given as --data.
    assert load_cifar10(tmp_path / "cifar-10-batches-bin").layout == "bin"
    write_npy_layout(tmp_path, train, test)
    assert load_cifar10(tmp_path).layout == "npy"  # the 2017 arrays first


def test_missing_folder_names_the_three_layouts(tmp_path):
    with pytest.raises(UserError, match="does not exist") as err:
        load_cifar10(tmp_path / "nowhere")
    assert_names_layouts(str(err.value))
    with pytest.raises(UserError, match="no CIFAR-10 data") as err:
        load_cifar10(tmp_path)
    assert_names_layouts(str(err.value))


def test_forced_format_names_the_file_it_expected(tmp_path, arrays):
    write_py_layout(tmp_path, *arrays)
    with pytest.raises(UserError, match="'data_batch_1.bin' not found in .*cifar-10-batches-bin") as err:
        load_cifar10(tmp_path, "bin")
    assert_names_layouts(str(err.value))
    with pytest.raises(UserError, match="'train_data'"):
        load_cifar10(tmp_path, "npy")


@pytest.mark.parametrize("layout,missing", [("bin", "cifar-10-batches-bin/data_batch_3.bin"),
                                            ("py", "cifar-10-batches-py/test_batch"),
                                            ("npy", "test_labels")])
def test_missing_file_is_named(tmp_path, arrays, layout, missing):
    {"bin": write_bin_layout, "py": write_py_layout, "npy": write_npy_layout}[layout](tmp_path, *arrays)
    os.unlink(tmp_path / missing)
    with pytest.raises(UserError) as err:
        load_cifar10(tmp_path)
    assert str(tmp_path / missing) in str(err.value) and "missing" in str(err.value)
    assert_names_layouts(str(err.value))


def test_truncated_binary_batch(tmp_path, arrays):
    folder = write_bin_layout(tmp_path, *arrays)
    path = folder / "data_batch_2.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match="data_batch_2.bin is not a CIFAR-10 binary batch.*3073-byte records"):
        load_cifar10(tmp_path)


def test_label_out_of_range(tmp_path, arrays):
    (train_images, train_labels), test = arrays
    labels = train_labels.copy()
    labels[5] = 12
    write_bin_layout(tmp_path, (train_images, labels), test)
    with pytest.raises(UserError, match="label 12 out of range 0-9"):
        load_cifar10(tmp_path)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_python_batches_cannot_run_code(tmp_path, arrays):
    folder = write_py_layout(tmp_path, *arrays)
    with open(folder / "data_batch_4", "wb") as handle:
        pickle.dump({"data": Evil(), "labels": [0]}, handle, protocol=2)
    with pytest.raises(UserError, match="data_batch_4 is not a CIFAR-10 python batch.*refusing to load"):
        load_cifar10(tmp_path)


def test_malformed_python_batch(tmp_path, arrays):
    folder = write_py_layout(tmp_path, *arrays)
    with open(folder / "data_batch_1", "wb") as handle:
        pickle.dump({"data": np.zeros((3, 100), np.uint8), "labels": [0, 1, 2]}, handle)
    with pytest.raises(UserError, match="data_batch_1: 'data' is uint8 \\(3, 100\\)"):
        load_cifar10(tmp_path)
    (folder / "data_batch_1").write_bytes(b"not a pickle at all")
    with pytest.raises(UserError, match="data_batch_1 is not a CIFAR-10 python batch"):
        load_cifar10(tmp_path)


def test_malformed_npy_arrays(tmp_path, arrays):
    train, test = arrays
    write_npy_layout(tmp_path, train, test)
    np.save(tmp_path / "train_data.npy", np.zeros((64, 3, 16, 16), np.float32))
    os.replace(tmp_path / "train_data.npy", tmp_path / "train_data")
    with pytest.raises(UserError, match="train_data: array is float32 \\(64, 3, 16, 16\\)"):
        load_cifar10(tmp_path)
    with open(tmp_path / "train_data", "wb") as handle:
        np.save(handle, np.array([{"a": 1}] * 64, dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="train_data is not a readable numpy array file"):
        load_cifar10(tmp_path)  # object arrays would need pickle: refused
    write_npy_layout(tmp_path, train, (test[0], test[1][:-1]))
    with pytest.raises(UserError, match="test_labels: labels have shape \\(31,\\), expected \\(32,\\)"):
        load_cifar10(tmp_path)


def test_main_reports_bad_data_in_one_line(tmp_path):
    result = run_script("CIFAR_10/main.py", ["--data", tmp_path / "nowhere", "--epochs", "1"], timeout=120)
    assert_one_line_error(result, "does not exist", *LAYOUT_NAMES)
    assert LAYOUT_HELP in result.stderr
