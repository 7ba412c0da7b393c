"""``python -m xnornet.export``, the ``.xnor`` file, and ``main.py --evaluate --packed``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, assert_one_line_error, run_script
from xnornet import BinOp
from xnornet.cli import UserError
from xnornet.packed import pack_model
from xnornet.packed.archs import build_arch
from xnornet.packed.fileformat import FORMAT_NAME, FORMAT_VERSION, load_packed, read_packed, save_packed

from test_packed_kernels import randomize_batchnorm


def lenet_checkpoint(path: Path, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_arch("LeNet_5").eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(0))
    torch.save({"arch": "LeNet_5", "state_dict": model.state_dict(), "acc": 98.5, **extra}, path)
    return model


def run_module(module: str, args, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository root, on one thread (like conftest.run_script)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_export_cli_writes_a_pickle_free_file_20x_smaller(tmp_path: Path) -> None:
    model = lenet_checkpoint(tmp_path / "lenet.pth")
    result = run_module("xnornet.export", [tmp_path / "lenet.pth", "-o", tmp_path / "lenet.xnor"], timeout=180)
    assert result.returncode == 0, result.stderr
    for fragment in ("bin_conv2", "xnor conv 5x5", "bin_ip1", "xnor linear", "ip2", "bits/w", "file"):
        assert fragment in result.stdout

    from safetensors import safe_open  # plain arrays and strings: no pickle involved

    with safe_open(str(tmp_path / "lenet.xnor"), framework="np") as handle:
        metadata = handle.metadata()
        bits = handle.get_tensor("bin_ip1.weight_bits")
    assert metadata["format"] == FORMAT_NAME and metadata["version"] == str(FORMAT_VERSION)
    assert metadata["arch"] == "LeNet_5" and json.loads(metadata["blocks"])["bin_conv2"] == "xnor conv 20->50 k5 s1 p0 g1"
    assert bits.dtype == np.uint64 and bits.size == 400_000 // 64

    float32_bytes = 4 * sum(v.numel() for k, v in model.state_dict().items() if "num_batches" not in k)
    assert float32_bytes / (tmp_path / "lenet.xnor").stat().st_size >= 20

    loaded, _ = load_packed(tmp_path / "lenet.xnor")
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), pack_model(model)(x))


@pytest.mark.parametrize("arch, model_args", [("nin", {}), ("nin_K", {}),
                                              ("alexnet", {"input_size": 67, "hidden_features": 32})])
def test_saved_files_rebuild_the_same_packed_model(tmp_path: Path, arch: str, model_args: dict) -> None:
    torch.manual_seed(1)
    model = build_arch(arch, model_args).eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(1))
    packed = pack_model(model)
    save_packed(packed, tmp_path / "m.xnor", arch=arch, model_args=model_args)
    loaded, metadata = load_packed(tmp_path / "m.xnor")
    assert metadata["arch"] == arch and json.loads(metadata["model_args"]) == model_args
    size = model_args.get("input_size", 32)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(loaded(x), packed(x))


def test_bad_packed_files_are_one_line_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_packed(tmp_path / "missing.xnor")
    (tmp_path / "junk.xnor").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(UserError, match="not a packed xnornet model"):
        load_packed(tmp_path / "junk.xnor")

    from safetensors.numpy import save_file

    def assert_refused(arrays: dict, metadata: dict, match: str) -> None:
        save_file(arrays, str(tmp_path / "bad.xnor"), metadata=metadata)
        with pytest.raises(UserError, match=match):
            load_packed(tmp_path / "bad.xnor")

    model = build_arch("LeNet_5").eval()
    save_packed(pack_model(model), tmp_path / "good.xnor", arch="LeNet_5")
    arrays, metadata = read_packed(tmp_path / "good.xnor")
    assert_refused(arrays, {**metadata, "version": "99"}, "version 99")
    assert_refused(arrays, {**metadata, "arch": "LeNet_5_K"}, "bin_conv2 is")
    del arrays["ip2.weight"]
    assert_refused(arrays, metadata, "missing: ip2.weight")
    with pytest.raises(UserError, match="unknown architecture"):
        build_arch("ResNet_18")

    # A fusion plan that names layers the architecture does not have, or is not JSON; a missing limit.
    nin = build_arch("nin").eval()
    save_packed(pack_model(nin), tmp_path / "nin.xnor", arch="nin")
    arrays, metadata = read_packed(tmp_path / "nin.xnor")
    plan = json.loads(metadata["fusion"])
    plan["bit_pools"] = {"xnor.99": 1}
    assert_refused(arrays, {**metadata, "fusion": json.dumps(plan)}, "fusion plan does not fit nin")
    assert_refused(arrays, {**metadata, "fusion": "{"}, "unreadable metadata")
    del arrays["xnor.3.output_limit"]
    assert_refused(arrays, metadata, "xnor.3 is incomplete or malformed")


def test_export_needs_an_architecture(tmp_path: Path) -> None:
    from xnornet import export

    torch.save({"state_dict": build_arch("LeNet_5").state_dict(), "best_prec1": 99.0}, tmp_path / "2017.pth")
    args = export.get_args_parser().parse_args([str(tmp_path / "2017.pth"), "-o", str(tmp_path / "m.xnor")])
    with pytest.raises(UserError, match="pass --arch"):
        export.main(args)
    args.arch = "LeNet_5"
    assert export.main(args)["file_bytes"] == (tmp_path / "m.xnor").stat().st_size


def test_export_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    result = run_module("xnornet.export", [tmp_path / "none.pth", "-o", tmp_path / "x.xnor"])
    assert_one_line_error(result, "does not exist")
    lenet_checkpoint(tmp_path / "lenet.pth")
    result = run_module("xnornet.export", [tmp_path / "lenet.pth", "--arch", "nin", "-o", tmp_path / "x.xnor"])
    assert_one_line_error(result, "does not fit", "check --arch")
    assert not (tmp_path / "x.xnor").exists()


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_main_evaluate_packed_gives_the_simulated_result(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("t10k", 200)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)), 2051)
        write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, count), 2049)
    model = lenet_checkpoint(tmp_path / "lenet.pth")

    result = run_script("MNIST/main.py", ["--pretrained", tmp_path / "lenet.pth", "--evaluate", "--packed",
                                          "--data", tmp_path, "--test-batch-size", 64], timeout=180)
    assert result.returncode == 0, result.stderr
    packed_result = json.loads(result.stdout.strip().splitlines()[-1])

    sys.path.insert(0, str(REPO_ROOT / "MNIST"))
    try:
        from mnist_data import load_split, normalize
    finally:
        sys.path.remove(str(REPO_ROOT / "MNIST"))
    images, labels = load_split(tmp_path, "test")
    with torch.no_grad(), BinOp(model).binarized():
        predictions = model(normalize(images)).argmax(dim=1)
    assert packed_result["test_count"] == 200
    assert packed_result["test_correct"] == int((predictions == labels).sum())

    result = run_script("MNIST/main.py", ["--pretrained", tmp_path / "lenet.pth", "--packed", "--data", tmp_path])
    assert_one_line_error(result, "--packed needs --evaluate")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_packed_files_and_checkpoints_get_the_usual_mode_of_a_new_file(tmp_path: Path, umask: int) -> None:
    """Both are written through a temporary file (0600 when made) and renamed: each ends with
    0666 minus the umask, as a file opened for writing would (safetensors replaced its 0600)."""
    from xnornet.checkpoint import save_atomic

    model = build_arch("LeNet_5").eval()
    previous = os.umask(umask)
    try:
        save_packed(pack_model(model), tmp_path / "m.xnor", arch="LeNet_5")
        save_atomic({"state_dict": model.state_dict()}, tmp_path / "m.pth")
    finally:
        os.umask(previous)
    for name in ("m.xnor", "m.pth"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
