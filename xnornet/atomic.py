"""Atomic file writes: write a temporary file beside the target, then rename it over."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

from .faults import fault_point


@contextlib.contextmanager
def atomic_file(path: Union[str, os.PathLike]) -> Iterator[str]:
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path``.

    On any error the temporary file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fault_point("save.begin")
        yield tmp_name
        # After the write: a writer may replace the temporary file by one of its own (safetensors
        # does), with mkstemp's 0600 or another mode. The result gets the usual mode of a new file.
        os.chmod(tmp_name, 0o666 & ~current_umask())
        with open(tmp_name, "rb") as handle:
            os.fsync(handle.fileno())
        fault_point("save.written")
        os.replace(tmp_name, path)
        fault_point("save.replaced")
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back at once)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask
