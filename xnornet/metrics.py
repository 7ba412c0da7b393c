"""JSON-lines metrics and the run header (git commit, hardware, arguments)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> Optional[str]:
    """The repository's HEAD commit, with ``-dirty`` when tracked files differ; None outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """A short description of where a number was measured."""
    info: Dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_header(args: Mapping[str, Any], **extra: Any) -> Dict[str, Any]:
    """The first record of a log: what ran, where, from which commit."""
    device = extra.pop("device", None)
    return {
        "event": "start",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": git_commit(),
        "hardware": hardware(device),
        "args": {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in args.items()},
        **extra,
    }


class MetricsLog:
    """Appends one JSON object per line to ``path`` (flushed at once)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=False) + "\n")
