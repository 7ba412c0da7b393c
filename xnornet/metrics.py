"""JSON-lines metrics and the run header (git commit, hardware, arguments); reading logs back.

A recipe's ``log.jsonl`` holds one header (``{"event": "start", ...}``) each time a run
starts or is resumed, then one record per finished epoch. :func:`read_run_log` reads it
back as one run: the last run the log holds, its epochs in order.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

from .atomic import atomic_file
from .cli import UserError, check_file, one_line
from .faults import fault_point

if TYPE_CHECKING:  # torch is imported where it is used, so that reading logs does not load it
    import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
LOG = logging.getLogger("xnornet")


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
    import torch

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

    def reconcile(self, finished_epoch: int, record: Optional[Mapping[str, Any]]) -> int:
        """Make the epoch records agree with a checkpoint that finished ``finished_epoch``.

        Records of later epochs (written before a stop, or left by a resume from an older
        ``best.pth``) are dropped, since those epochs are trained again; a line cut short by
        a stop mid-write is dropped; ``record``, the checkpoint's own copy of its epoch's
        line, is appended when the log lacks it (a stop between the checkpoint and the log
        line). A missing file is left missing (a resume into a new folder starts a new log).
        The file is rewritten atomically only when something changes. Returns the
        number of epoch records dropped.
        """
        if not self.path.exists():
            return 0  # a resume into a new folder starts a new log
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept, dropped, logged, changed = [], 0, False, False
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                changed = True  # a line cut short by a stop while it was written
                continue
            epoch = entry.get("epoch") if isinstance(entry, dict) and "event" not in entry else None
            if isinstance(epoch, int) and epoch > finished_epoch:
                dropped += 1
                changed = True
                continue
            logged = logged or epoch == finished_epoch
            kept.append(line)
        if not logged and record is not None:
            kept.append(json.dumps(dict(record)))
            changed = True
        if changed:
            with atomic_file(self.path) as tmp_name:
                Path(tmp_name).write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        return dropped

    def write(self, record: Mapping[str, Any], fresh: bool = False) -> None:
        """Append ``record``; ``fresh`` replaces the file's content with it instead."""
        fault_point("log.write")
        with open(self.path, "w" if fresh else "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=False) + "\n")


def read_log(path: Path) -> List[Dict[str, Any]]:
    """The JSON records of a log, in order. A last line cut short (a run killed while writing
    it) is skipped; any other line that is not a JSON object is a :class:`UserError`."""
    path = check_file(path, "log")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not a readable JSON-lines log ({one_line(str(err), 160)})") from None
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    records = []
    for index, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if index == len(numbered) - 1 and index > 0:
                LOG.warning("%s: line %d is cut short (a run stopped while writing it); read the lines before it",
                            path, number)
                break
            raise UserError(f"{path} is not a readable JSON-lines log: line {number} is not JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path} is not a readable JSON-lines log: line {number} is not a JSON object")
        records.append(record)
    return records


def is_header(record: Mapping[str, Any]) -> bool:
    return record.get("event") == "start"


def is_epoch_record(record: Mapping[str, Any]) -> bool:
    return "epoch" in record and "event" not in record and isinstance(record.get("epoch"), int)


def read_run_log(path: Path) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """``(headers, epochs)`` of the last run in a log that logged an epoch.

    A header whose arguments have no ``resume`` starts a new run; a resumed run's header
    continues the one before it. Earlier runs in the same file (a log written before fresh
    runs started their log anew) and runs stopped before their first epoch are passed over.
    ``headers`` are the run's headers, its start first (none for a log without headers);
    ``epochs`` holds the last record of each epoch (a resume from an earlier checkpoint logs
    some twice), in epoch order. Raises :class:`UserError` when no run finished an epoch.
    """
    runs: List[Tuple[List[Dict[str, Any]], Dict[int, Dict[str, Any]]]] = []
    for record in read_log(path):
        if is_header(record):
            if runs and (record.get("args") or {}).get("resume"):
                runs[-1][0].append(record)
            else:
                runs.append(([record], {}))
        elif is_epoch_record(record):
            if not runs:
                runs.append(([], {}))
            runs[-1][1][int(record["epoch"])] = record
    for headers, by_epoch in reversed(runs):
        if by_epoch:
            return headers, [by_epoch[epoch] for epoch in sorted(by_epoch)]
    raise UserError(f"{path} holds no epoch record (a run stopped before its first epoch ended, "
                    "or not a training log)")
