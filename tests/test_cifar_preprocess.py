"""GCN, ZCA and their cache; batched crop/flip; the two data protocols."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "CIFAR_10"))

import gcn_zca  # noqa: E402
from cifar_data import RawCifar  # noqa: E402
from cifar_protocol import channel_stats, prepare  # noqa: E402
from gcn_zca import cached_gcn_zca, fit_zca, global_contrast_normalize  # noqa: E402
from xnornet.augment import random_crop_flip  # noqa: E402
from xnornet.cache import CACHE_ENV, fingerprint, load_entry, resolve_cache_dir, save_entry  # noqa: E402
from xnornet.cli import UserError  # noqa: E402

# --------------------------------------------------------------------------- GCN


def test_gcn_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]], dtype=torch.float64)
    out = global_contrast_normalize(x, scale=55.0)
    centered = [-1.5, -0.5, 0.5, 1.5]
    norm = math.sqrt(sum(v * v for v in centered))  # sum, not mean, of squares (use_std=False)
    assert torch.allclose(out[0], torch.tensor([55.0 * v / norm for v in centered], dtype=torch.float64))
    # A constant row: the divisor is 0 < min_divisor, so it is replaced by 1.
    assert torch.equal(out[1], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(x[1], torch.full((4,), 5.0, dtype=torch.float64))  # input untouched


def test_gcn_options_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    std = math.sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3)  # ddof = 1
    out = global_contrast_normalize(x, scale=2.0, use_std=True, sqrt_bias=0.0)
    assert torch.allclose(out, 2.0 * (x - 2.5) / std)
    out = global_contrast_normalize(x, scale=1.0, subtract_mean=False, sqrt_bias=10.0)
    assert torch.allclose(out, x / math.sqrt(10.0 + 30.0))


# --------------------------------------------------------------------------- ZCA


def test_zca_known_answer_2d():
    # Mean 0, covariance diag(2, 0.5) exactly.
    x = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    zca = fit_zca(x, filter_bias=0.0)
    assert torch.allclose(zca.mean, torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(zca.matrix, torch.diag(torch.tensor([1 / math.sqrt(2.0), 1 / math.sqrt(0.5)],
                                                              dtype=torch.float64)), atol=1e-12)
    zca = fit_zca(x + torch.tensor([3.0, -1.0], dtype=torch.float64), filter_bias=0.5)
    assert torch.allclose(zca.mean, torch.tensor([3.0, -1.0], dtype=torch.float64))
    assert torch.allclose(zca.matrix, torch.diag(torch.tensor([1 / math.sqrt(2.5), 1.0], dtype=torch.float64)),
                          atol=1e-12)


def test_zca_whitens_a_known_covariance():
    generator = torch.Generator().manual_seed(0)
    mixing = torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.5, -1.0, 0.3, 0.0],
                           [0.0, 0.2, 0.1, 3.0]], dtype=torch.float64)
    x = torch.randn(20000, 4, generator=generator, dtype=torch.float64) @ mixing.T + 5.0
    zca = fit_zca(x, filter_bias=1e-12, chunk_rows=777)  # chunking must not change the result
    white = zca.apply(x).double()
    covariance = (white - white.mean(0)).T @ (white - white.mean(0)) / len(white)
    assert torch.allclose(covariance, torch.eye(4, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(zca.matrix, zca.matrix.T)
    # The sample covariance estimates the known one, mixing @ mixing.T.
    eigenvalues = torch.linalg.eigvalsh(mixing @ mixing.T)
    assert torch.allclose(zca.eigenvalues, eigenvalues, rtol=0.05)
    # With a filter bias the whitened covariance is V diag(l / (l + b)) V^T.
    bias = 2.0
    zca = fit_zca(x, filter_bias=bias)
    white = zca.apply(x).double()
    observed = torch.linalg.eigvalsh((white - white.mean(0)).T @ (white - white.mean(0)) / len(white))
    assert torch.allclose(observed, zca.eigenvalues / (zca.eigenvalues + bias), atol=1e-5)


def test_zca_needs_a_filter_bias_for_singular_data():
    x = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="singular"):
        fit_zca(x, filter_bias=0.0)


# ------------------------------------------------------------------------- cache


def small_images(seed: int, count: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 3, 4, 4), dtype=np.uint8)


def test_gcn_zca_is_cached_and_keyed_by_the_data(tmp_path, monkeypatch):
    train, test = small_images(0, 200), small_images(1, 50)
    first = cached_gcn_zca(train, test, tmp_path)
    entries = list(tmp_path.iterdir())
    assert len(entries) == 1 and entries[0].is_dir()
    # The cached result is the transform fitted on the training set only.
    rows = global_contrast_normalize(torch.from_numpy(train).reshape(200, -1).double()).float()
    zca = fit_zca(rows)
    assert np.allclose(first[0].reshape(200, -1), zca.apply(rows).numpy(), atol=1e-4)
    test_rows = global_contrast_normalize(torch.from_numpy(test).reshape(50, -1).double()).float()
    assert np.allclose(first[1].reshape(50, -1), zca.apply(test_rows).numpy(), atol=1e-4)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(gcn_zca, "gcn_zca", fail)
    again = cached_gcn_zca(train, test, tmp_path)
    assert np.array_equal(again[0], first[0]) and np.array_equal(again[1], first[1])
    changed = train.copy()
    changed[0, 0, 0, 0] ^= 1
    with pytest.raises(AssertionError, match="recomputed"):
        cached_gcn_zca(changed, test, tmp_path)  # other data: never the stale entry
    monkeypatch.setattr(gcn_zca, "PREPROCESS_VERSION", gcn_zca.PREPROCESS_VERSION + 1)
    with pytest.raises(AssertionError, match="recomputed"):
        cached_gcn_zca(train, test, tmp_path)  # other code version


def test_cache_entries_are_written_whole(tmp_path):
    entry = tmp_path / "cache" / "entry"
    save_entry(entry, {"a": np.arange(5), "b": np.ones((2, 2), np.float32)})
    loaded = load_entry(entry, ("a", "b"))
    assert np.array_equal(loaded["a"], np.arange(5)) and loaded["b"].shape == (2, 2)
    assert [p.name for p in entry.parent.iterdir()] == ["entry"]  # no staging folder left
    (entry / "b.npy").write_bytes(b"garbage")
    assert load_entry(entry, ("a", "b")) is None  # unreadable: recomputed, not trusted
    save_entry(entry, {"a": np.arange(3), "b": np.zeros(1)})
    assert np.array_equal(load_entry(entry, ("a", "b"))["a"], np.arange(3))
    assert load_entry(tmp_path / "absent", ("a",)) is None


def test_unwritable_cache_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="--cache-dir"):
        save_entry(blocker / "entry", {"a": np.arange(2)})


def test_fingerprint_sees_bytes_dtype_and_shape():
    a = np.arange(6, dtype=np.uint8)
    base = fingerprint("x", 1, a)
    assert base == fingerprint("x", 1, a.copy())
    assert base != fingerprint("x", 2, a)
    assert base != fingerprint("x", 1, a.reshape(2, 3))
    assert base != fingerprint("x", 1, a.astype(np.int16))
    assert base != fingerprint("x", 1, a[::-1])


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "flag") == tmp_path / "flag"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir() == tmp_path / "xdg" / "xnornet"


# ---------------------------------------------------------------------- augment


def test_random_crop_flip_gives_padded_crops_and_mirrors():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=generator)
    out = random_crop_flip(images, padding=2, generator=torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = F.pad(images, (2, 2, 2, 2))
    offsets, flips = set(), set()
    for i in range(len(images)):
        matches = [(y, x, flip) for y in range(5) for x in range(5) for flip in (False, True)
                   if torch.equal(out[i], (lambda c: c.flip(-1) if flip else c)(padded[i, :, y:y + 8, x:x + 8]))]
        assert len(matches) == 1, i  # every output is exactly one crop (and mirror) of its own image
        offsets.add(matches[0][:2])
        flips.add(matches[0][2])
    assert flips == {False, True} and len(offsets) > 15
    again = random_crop_flip(images, padding=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)  # reproducible from the generator
    assert torch.equal(random_crop_flip(images, padding=0, flip=False), images)


def test_random_crop_pads_with_the_fill_value():
    """MNIST's shifts pad normalized images with the normalized background, not with 0."""
    images = torch.full((200, 1, 5, 5), 3.0)
    out = random_crop_flip(images, padding=2, generator=torch.Generator().manual_seed(0), flip=False, fill=-0.5)
    assert set(out.unique().tolist()) == {-0.5, 3.0}
    assert bool((out == 3.0).all(dim=(1, 2, 3)).any())  # the centred crop holds no padding


# --------------------------------------------------------------------- protocols


def raw_pixels(count_train: int = 40, count_test: int = 10) -> RawCifar:
    rng = np.random.default_rng(3)
    return RawCifar("bin", Path("synthetic"), rng.integers(0, 256, (count_train, 3, 32, 32), dtype=np.uint8),
                    rng.integers(0, 10, count_train), rng.integers(0, 256, (count_test, 3, 32, 32), dtype=np.uint8),
                    rng.integers(0, 10, count_test))


def test_channel_stats_match_numpy():
    raw = raw_pixels()
    mean, std = channel_stats(raw.train_images)
    pixels = raw.train_images.astype(np.float64) / 255.0
    assert np.allclose(mean.numpy(), pixels.mean(axis=(0, 2, 3)), atol=1e-6)
    assert np.allclose(std.numpy(), pixels.std(axis=(0, 2, 3)), atol=1e-6)


def test_standard_protocol_normalizes_and_augments(tmp_path):
    raw = raw_pixels()
    data = prepare(raw, "standard", device=torch.device("cpu"), cache_dir=tmp_path, train_subset=30, test_subset=5)
    assert len(data.train_labels) == 30 and data.test_images.shape == (5, 3, 32, 32)
    mean, std = channel_stats(raw.train_images)
    expected = (torch.from_numpy(raw.test_images[:5]).float() / 255.0 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert torch.allclose(data.test_images, expected, atol=1e-5)
    batch = data.train_transform(data.train_images[:8], torch.Generator().manual_seed(0))
    assert batch.dtype == torch.float32 and batch.shape == (8, 3, 32, 32)
    assert not torch.allclose(batch, (data.train_images[:8].float() / 255.0 - mean.view(1, 3, 1, 1))
                              / std.view(1, 3, 1, 1))  # augmented
    assert not list(tmp_path.iterdir())  # the standard protocol caches nothing


def test_seed_protocol_uses_2017_arrays_as_they_are(tmp_path):
    rng = np.random.default_rng(0)
    raw = RawCifar("npy", tmp_path, rng.standard_normal((6, 3, 32, 32)).astype(np.float32), np.arange(6),
                   rng.standard_normal((4, 3, 32, 32)).astype(np.float32), np.arange(4))
    data = prepare(raw, "seed", device=torch.device("cpu"), cache_dir=tmp_path / "cache")
    assert torch.equal(data.train_images, torch.from_numpy(raw.train_images))
    assert data.train_transform is None and not (tmp_path / "cache").exists()
    with pytest.raises(UserError, match="already GCN\\+ZCA"):
        prepare(raw, "standard", device=torch.device("cpu"), cache_dir=tmp_path)
    with pytest.raises(UserError, match="--train-subset 7 exceeds the 6 training"):
        prepare(raw, "seed", device=torch.device("cpu"), cache_dir=tmp_path, train_subset=7)


def test_zca_from_the_gram_matrix_equals_the_covariance_route():
    # Fewer rows than dimensions (as in tiny data sets): the covariance is singular.
    x = torch.randn(10, 30, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3 + 1
    for bias in (0.1, 2.0):
        slow = fit_zca(x, filter_bias=bias, method="covariance")
        fast = fit_zca(x, filter_bias=bias, method="gram")
        assert torch.allclose(fast.matrix, slow.matrix, atol=1e-9)
        assert torch.allclose(fast.eigenvalues, slow.eigenvalues, atol=1e-9)
        assert torch.allclose(fast.apply(x), slow.apply(x), atol=1e-5)
    assert fit_zca(x).eigenvalues.shape == (30,)  # auto picks the Gram route here
    with pytest.raises(ValueError, match="singular"):
        fit_zca(x, filter_bias=0.0, method="gram")
