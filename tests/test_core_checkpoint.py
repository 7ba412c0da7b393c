"""Checkpoint helpers: atomic save, safe loading with one-line errors, 2017 formats,
state-dict mismatch messages, and the RNG state round trip."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from xnornet.checkpoint import (
    capture_rng_state,
    load_file,
    load_model_state,
    model_state_from,
    restore_rng_state,
    save_atomic,
)
from xnornet.cli import UserError


def test_save_atomic_then_load_file_round_trip_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ckpt.pth"
    obj = {"state_dict": {"w": torch.randn(3, 4), "n": torch.tensor(7)}, "epoch": 3, "acc": 91.5, "name": "x"}
    save_atomic(obj, path)
    save_atomic(obj, path)  # overwriting goes through the same temp + rename
    loaded = load_file(path)
    assert loaded["epoch"] == 3 and loaded["acc"] == 91.5 and loaded["name"] == "x"
    for key, value in obj["state_dict"].items():
        assert torch.equal(loaded["state_dict"][key], value)
    assert os.listdir(path.parent) == ["ckpt.pth"]


def test_save_atomic_failure_keeps_previous_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    save_atomic({"epoch": 1}, path)
    with pytest.raises(Exception):
        save_atomic({"epoch": 2, "bad": lambda: None}, path)  # a lambda cannot be pickled
    assert os.listdir(tmp_path) == ["ckpt.pth"]
    assert load_file(path) == {"epoch": 1}


def test_load_file_missing_path_is_user_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(UserError) as info:
        load_file(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("seed", range(40))
def test_load_file_random_bytes_is_user_error_naming_path(tmp_path: Path, seed: int) -> None:
    """Garbage of several lengths (some make the unpickler raise IndexError/KeyError/struct.error)."""
    rng = random.Random(seed)
    path = tmp_path / f"garbage{seed}.pth"
    path.write_bytes(bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 3, 7, 20, 100, 4096]))))
    with pytest.raises(UserError) as info:
        load_file(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_load_file_truncated_and_non_dict_and_unsafe_files_are_user_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.pth"
    save_atomic({"state_dict": {"w": torch.randn(64, 64)}}, good)
    data = good.read_bytes()
    for length in (0, 1, 100, len(data) // 2, len(data) - 1):
        truncated = tmp_path / f"truncated{length}.pth"
        truncated.write_bytes(data[:length])
        with pytest.raises(UserError, match=str(truncated)):
            load_file(truncated)
    tensor_only = tmp_path / "tensor.pth"
    torch.save(torch.zeros(2), tensor_only)
    with pytest.raises(UserError, match=str(tensor_only)):
        load_file(tensor_only)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"module": nn.Linear(2, 2)}, unsafe)  # a pickled class: refused by weights_only
    with pytest.raises(UserError, match=str(unsafe)):
        load_file(unsafe)


def test_load_file_messages_keep_their_reason_and_say_what_the_file_is(tmp_path: Path) -> None:
    """The reason survives in one line (not cut mid-sentence); a directory, a packed .xnor model
    and an unsafe pickle are each named for what they are."""
    good = tmp_path / "good.pth"
    save_atomic({"state_dict": {"w": torch.randn(64, 64)}}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:1000])
    messages = {}
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"module": nn.Linear(2, 2)}, unsafe)
    from safetensors.numpy import save_file

    packed = tmp_path / "model.xnor"
    save_file({"w": np.zeros(4, dtype=np.uint64)}, str(packed), metadata={"format": "xnornet-packed"})
    for name, path in (("truncated", truncated), ("directory", tmp_path), ("packed", packed), ("unsafe", unsafe)):
        with pytest.raises(UserError) as info:
            load_file(path, "--pretrained checkpoint")
        messages[name] = str(info.value)
        assert "\n" not in messages[name] and messages[name].endswith((")", "load_packed", "file")), messages[name]
    assert "truncated or corrupt" in messages["truncated"]
    assert "is a directory, not a file" in messages["directory"]
    assert "packed .xnor model" in messages["packed"] and "--evaluate --packed take the .pth" in messages["packed"]
    assert "weights_only" in messages["unsafe"] and "torch.nn.modules.linear.Linear" in messages["unsafe"]


def test_model_state_from_accepts_2017_dict_and_strips_module_prefix() -> None:
    weight, bias = torch.randn(2, 3), torch.randn(2)
    legacy = {"acc": torch.tensor(99.1), "state_dict": {"module.fc.weight": weight, "module.fc.bias": bias}}
    state = model_state_from(legacy)
    assert set(state) == {"fc.weight", "fc.bias"}
    assert state["fc.weight"] is weight and state["fc.bias"] is bias
    assert set(model_state_from({"fc.weight": weight})) == {"fc.weight"}  # a bare state_dict
    # the 2017 ImageNet code wrapped only `features` in DataParallel
    inner = {"state_dict": {"features.module.0.weight": weight, "classifier.4.weight": bias}}
    assert set(model_state_from(inner)) == {"features.0.weight", "classifier.4.weight"}
    ours = {"format": "xnornet-checkpoint", "epoch": 2, "state_dict": {"fc.weight": weight}}
    assert set(model_state_from(ours)) == {"fc.weight"}
    with pytest.raises(UserError):
        model_state_from({"epoch": 3, "acc": 1.0})


def test_load_model_state_mismatch_names_missing_unexpected_and_reshaped_keys() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 4))
    state = {"0.weight": torch.randn(2, 3), "0.extra": torch.randn(1), "1.weight": torch.randn(4, 5),
             "1.bias": torch.randn(4)}
    with pytest.raises(UserError) as info:
        load_model_state(model, state, source="test file")
    message = str(info.value)
    assert "missing: 0.bias" in message
    assert "unexpected: 0.extra" in message
    assert "wrong shape: 1.weight" in message
    assert "test file" in message and "\n" not in message
    good = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    load_model_state(model, good)
    assert torch.equal(model[1].weight, good["1.weight"])


def test_missing_batchnorm_counters_of_old_files_are_zero_and_every_other_key_is_still_named() -> None:
    """Files of PyTorch 0.2-0.4 have no BatchNorm num_batches_tracked: those counters become 0
    (as PyTorch fills them); a file missing anything else is still refused, naming the key."""
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Flatten(), nn.BatchNorm1d(8))
    model.train()(torch.randn(4, 1, 2, 2))  # counters at 1
    source = {k: (v.clone() + 0.5 if v.is_floating_point() else v.clone()) for k, v in model.state_dict().items()}
    old = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}
    assert len(old) == len(source) - 2
    load_model_state(model, old)
    state = model.state_dict()
    assert state["1.num_batches_tracked"].item() == 0 and state["3.num_batches_tracked"].item() == 0
    assert state["1.num_batches_tracked"].dtype == torch.long
    assert all(torch.equal(state[k], v) for k, v in old.items())
    for broken, fragment in (({k: v for k, v in old.items() if k != "1.running_var"}, "missing: 1.running_var"),
                             ({**old, "2.weight": torch.zeros(1)}, "unexpected: 2.weight"),
                             ({**old, "3.running_mean": torch.zeros(3)}, "wrong shape: 3.running_mean")):
        with pytest.raises(UserError) as info:
            load_model_state(model, broken, source="old file")
        assert fragment in str(info.value) and "missing: 1.num_batches_tracked" not in str(info.value)
    # A counter that is there is loaded as it is.
    load_model_state(model, {**old, "1.num_batches_tracked": torch.tensor(7)})
    assert model.state_dict()["1.num_batches_tracked"].item() == 7


def test_legacy_non_zip_files_load_with_weights_only(tmp_path: Path) -> None:
    """torch.save's pre-1.6 format (what PyTorch 0.2-0.4 wrote), with the 2017 dict keys."""
    import zipfile

    weight = torch.randn(3, 2)
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "arch": "alexnet", "best_prec1": 44.87, "state_dict": {"features.module.0.weight": weight},
                "optimizer": torch.optim.Adam([nn.Parameter(weight.clone())]).state_dict()},
               path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    loaded = load_file(path)
    assert loaded["epoch"] == 3 and loaded["best_prec1"] == 44.87 and loaded["arch"] == "alexnet"
    assert torch.equal(model_state_from(loaded)["features.0.weight"], weight)


def _draw() -> tuple:
    return torch.rand(5), np.random.rand(5), random.random(), random.gauss(0.0, 1.0), np.random.randn(3)


def _assert_same_draws(first: tuple, second: tuple) -> None:
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2] == second[2]
    assert first[3] == second[3]
    assert np.array_equal(first[4], second[4])


def test_rng_state_round_trip_repeats_torch_numpy_python(tmp_path: Path) -> None:
    """capture -> draw -> restore -> draw repeats torch.rand, np.random.rand, random.random,
    also after the state went through save_atomic/load_file (weights_only) and with a
    pending random.gauss / np.random.randn second value."""
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    random.gauss(0.0, 1.0)  # leaves the second Gaussian of a pair pending in python's state
    np.random.randn(1)  # same for numpy's legacy generator
    state = capture_rng_state()
    first = _draw()
    restore_rng_state(state)
    _assert_same_draws(first, _draw())

    path = tmp_path / "rng.pth"
    save_atomic({"rng": state}, path)
    torch.rand(3)  # move every generator on
    np.random.rand(3)
    random.random()
    restore_rng_state(load_file(path)["rng"])
    _assert_same_draws(first, _draw())
