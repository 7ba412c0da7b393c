"""Whole networks through the packed engine equal the simulated networks (BinOp + float conv).

LeNet-5, NIN and AlexNet (at its smallest input, a narrow classifier) are built
by their recipes' model files; every variant with binarized blocks is covered.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import pytest
import torch
import torch.nn as nn

from xnornet import BinConv2d, BinOp
from xnornet.cli import UserError
from xnornet.packed import PackedBinConv2d, pack_for_evaluation, pack_model
from xnornet.packed.archs import build_arch
from xnornet.packed.engine import PackedMaxPool2d

from test_packed_kernels import randomize_batchnorm

NETWORKS = [
    ("LeNet_5", {}, (1, 28, 28)),
    ("LeNet_5_K", {}, (1, 28, 28)),
    ("LeNet_5_bwn", {}, (1, 28, 28)),
    ("nin", {}, (3, 32, 32)),
    ("nin_K", {}, (3, 32, 32)),
    ("alexnet", {"input_size": 67, "hidden_features": 96, "num_classes": 12}, (3, 67, 67)),
    ("alexnet", {"input_size": 99, "hidden_features": 64, "num_classes": 5}, (3, 99, 99)),
]


def network(arch: str, model_args: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_arch(arch, model_args).eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    return model


@pytest.mark.parametrize("arch, model_args, shape", NETWORKS)
def test_packed_network_equals_the_simulated_network(arch, model_args, shape) -> None:
    model = network(arch, model_args, seed=len(arch))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    packed = pack_model(model)
    for key, value in model.state_dict().items():  # packing copies; the model is untouched
        assert torch.equal(value, before[key]), key
    blocks = [m for m in model.modules() if isinstance(m, BinConv2d)]
    assert sum(isinstance(m, PackedBinConv2d) for m in packed.modules()) == len(blocks) > 0
    assert not any(isinstance(m, BinConv2d) for m in packed.modules())

    generator = torch.Generator().manual_seed(0)
    for batch in (1, 4):
        x = torch.randn(batch, *shape, generator=generator)
        with torch.no_grad():
            with BinOp(model).binarized():
                reference = model(x)
            out = packed(x)
        assert torch.equal(out.argmax(dim=1), reference.argmax(dim=1))
        relative = (out - reference).abs().amax(dim=1) / reference.abs().amax(dim=1)
        assert relative.max() <= 1e-4, relative.max()


def test_blocks_are_replaced_by_type_and_every_other_layer_stays_float() -> None:
    """Blocks become packed modules; other layers stay as they were unless the fusion plan names them."""
    model = network("nin", {}, seed=0)
    packed = pack_model(model)
    plan = packed.fusion_plan
    folded = {name for chain in plan.folded.values() for name in chain} | set(plan.float_folds)
    changed = folded | set(plan.bit_pools) | set(plan.float_folds.values())
    assert folded == {"xnor.1", "xnor.2", "xnor.12"} and set(plan.bit_pools) == {"xnor.5"}
    blocks = {name for name, module in model.named_modules() if isinstance(module, BinConv2d)}
    for name, module in model.named_modules():
        if name in blocks:
            assert isinstance(packed.get_submodule(name), PackedBinConv2d)
        elif name in folded:
            assert isinstance(packed.get_submodule(name), nn.Identity), name
        elif name in plan.bit_pools:
            assert isinstance(packed.get_submodule(name), PackedMaxPool2d), name
        elif not any(name.startswith(block + ".") for block in blocks):
            assert type(packed.get_submodule(name)) is type(module), name
    float_keys = [key for key in model.state_dict()
                  if not any(key.startswith(prefix + ".") for prefix in blocks | changed)]
    assert float_keys and all(torch.equal(packed.state_dict()[k], model.state_dict()[k]) for k in float_keys)


def test_pack_for_evaluation_rejects_what_it_cannot_run() -> None:
    with pytest.raises(UserError, match="no BinConv2d"):
        pack_for_evaluation(build_arch("LeNet_5_float"), torch.device("cpu"))
    with pytest.raises(UserError, match="CPU"):
        pack_for_evaluation(build_arch("LeNet_5"), torch.device("cuda"))


def test_benchmark_logs_every_block_and_the_network(tmp_path) -> None:
    from xnornet.packed import benchmark

    args = benchmark.get_args_parser().parse_args(
        ["--archs", "LeNet_5", "--batch-sizes", "2", "--threads", "1", "--repeats", "3", "--budget", "0",
         "--out", str(tmp_path / "bench.jsonl")])
    records = benchmark.main(args)
    lines = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "start" and "hardware" in lines[0] and "load_average" in lines[0]
    assert [r["layer"] for r in lines if r["event"] == "layer"] == ["bin_conv2", "bin_ip1"]
    size = next(r for r in lines if r["event"] == "size")
    assert size["compression"] == size["float32_bytes"] / size["file_bytes"] > 20
    network = [r for r in records if r["event"] == "network"]
    assert len(network) == 2 and all(r["speedup"] == r["float_ms"] / r["packed_ms"] for r in network)


@pytest.mark.parametrize("float_first_is_slower", [True, False])
def test_benchmark_times_the_faster_side_as_long_as_the_slower(monkeypatch, float_first_is_slower: bool) -> None:
    """Per round: a warm-up and 7 timed runs each, then the faster side runs until its timed
    runs last as long as the slower side's (on a clock that only the runs move)."""
    from xnornet.packed import benchmark

    clock = [0.0]
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: clock[0])
    calls = {"slow": 0, "fast": 0}

    def run(name: str, seconds: float) -> Callable[[], None]:
        def step() -> None:
            calls[name] += 1
            clock[0] += seconds
        return step

    slow, fast = run("slow", 2.0 ** -6), run("fast", 2.0 ** -9)  # 8 to 1, in sums without rounding
    runs = (slow, fast) if float_first_is_slower else (fast, slow)
    medians = benchmark.paired_median_ms(*runs, repeats=21, budget=100.0)
    expected = (1000 * 2.0 ** -6, 1000 * 2.0 ** -9)
    assert medians == pytest.approx(expected if float_first_is_slower else expected[::-1])
    # 3 rounds: the slow side 1 + 7 runs; the fast side 1 + 56 (+1 warm-up when it is float and goes again)
    assert calls == {"slow": 3 * 8, "fast": 3 * (57 if float_first_is_slower else 58)}


def test_benchmark_runs_each_thread_count_in_a_fresh_process(tmp_path) -> None:
    from xnornet.packed import benchmark

    out = tmp_path / "bench.jsonl"
    args = benchmark.get_args_parser().parse_args(
        ["--archs", "LeNet_5", "--batch-sizes", "1", "--threads", "1", "2", "--repeats", "3", "--budget", "0",
         "--out", str(out)])
    records = benchmark.main(args)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    headers = [r for r in lines if r["event"] == "start"]
    assert [h["args"]["threads"] for h in headers] == [[1], [2]]
    assert [h["omp_num_threads"] for h in headers] == ["1", "2"]
    assert sorted({r["threads"] for r in records}) == [1, 2] and len(records) == 2 * (2 + 2)


def test_contention_times_both_blocks_alone_and_beside_a_busy_core(tmp_path, two_threads) -> None:
    from xnornet.packed import contention

    args = contention.get_args_parser().parse_args(
        ["--seconds", "0", "--batch-sizes", "1", "--out", str(tmp_path / "contention.jsonl")])
    if len(os.sched_getaffinity(0)) < 2:
        with pytest.raises(UserError, match="two CPUs"):
            contention.main(args)
        return
    records = contention.main(args)
    assert [(r["layer"], r["other_core_busy"]) for r in records] == [
        ("xnor.6", False), ("xnor.10", False), ("xnor.6", True), ("xnor.10", True)]
    lines = [json.loads(line) for line in (tmp_path / "contention.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "start" and lines[1:] == records and all(r["packed_ms"] > 0 for r in records)


def test_threads_report_logs_both_layers_and_both_builds(tmp_path, two_threads) -> None:
    from xnornet.packed import threads_report

    out = tmp_path / "threads.jsonl"
    records = threads_report.main(threads_report.get_args_parser().parse_args(["--repeats", "3", "--out", str(out)]))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    loops = [r for r in lines if r["event"] == "loop"]
    assert [(r["layer_asked"], r["layer"]) for r in loops] == [("omp", "omp"), ("workqueue", "workqueue")]
    assert all(r["empty_loop_us"] > 0 and r["float_conv_after_loop_us"] > 0 for r in loops)
    blocks = [r for r in records if r["event"] == "block"]
    assert [(r["layer"], r["batch"]) for r in blocks] == [
        ("xnor.6", 1), ("xnor.10", 1), ("xnor.6", 64), ("xnor.10", 64)]
    assert all(r["kernel_serial_us"] > 0 and r["kernel_parallel_us"] > 0 for r in blocks)
    crossings = [r for r in lines if r["event"] == "crossover"]
    assert {r["kernel"] for r in crossings} >= {"xnor_conv", "pack_nchw", "pack_nhwc", "merge_kernel_rows"}
    assert {r["arch"] for r in crossings} == {"LeNet_5", "nin", "alexnet"}
    assert all(r["work"] > 0 and r["serial_us"] > 0 and r["parallel_us"] > 0 for r in crossings)
