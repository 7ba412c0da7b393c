"""Shared test helpers: run a recipe's main.py in a subprocess, on one thread."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Sequence

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_module(script: str, name: str) -> ModuleType:
    """``script`` (a path relative to the repository) executed as a module called ``name``:
    every recipe's entry point is a main.py, so each needs a name of its own."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(script: str, args: Sequence[str], cwd: Path = REPO_ROOT, timeout: float = 300,
               env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``python <script> <args>`` from ``cwd``; returns the completed process (text output).

    ``script`` is a path relative to the repository, or ``-m package.module`` for a module.
    """
    target = ["-m", script[3:].strip()] if script.startswith("-m ") else [str(REPO_ROOT / script)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    if env_extra:
        env.update(env_extra)
    return subprocess.run(
        [sys.executable, *target, *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A bad-input failure: non-zero exit, no traceback, one line on stderr naming ``fragments``."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


class ReferenceSign(torch.autograd.Function):
    """Hand-written reference sign: forward eq. (2), +1 where x >= 0 else -1.

    Backward: the weights' STE of eq. (4), 1{|x| <= 1}, when ``inclusive``; the activations'
    STE of eq. (5), 1{|x| < 1}, otherwise. Use ``ReferenceSign.apply(x, inclusive)``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, inclusive: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.inclusive = inclusive
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        mask = x.abs() <= 1 if ctx.inclusive else x.abs() < 1
        return grad * mask.to(grad.dtype), None


@pytest.fixture
def two_threads():
    """numba's parallel loops on two threads for the test; numba's and PyTorch's thread counts restored after."""
    from xnornet.packed import kernels

    torch_threads, numba_threads = torch.get_num_threads(), kernels.numba.get_num_threads()
    kernels.sync_threads(2)
    yield
    torch.set_num_threads(torch_threads)
    kernels.sync_threads(numba_threads)


@pytest.fixture
def run_main():
    return run_script
