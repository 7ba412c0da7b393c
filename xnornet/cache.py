"""A cache for expensive preprocessing results: where it lives, how entries are keyed and written.

Entries are folders of ``.npy`` files named by a content fingerprint, so a
changed input, parameter or code version gets a new entry and a stale one is
never read. Folders are written under a temporary name and renamed into place,
so a crash never leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .cli import UserError

LOG = logging.getLogger("xnornet")

#: Environment variable naming the cache folder (overridden by a recipe's --cache-dir).
CACHE_ENV = "XNORNET_CACHE"

Part = Union[bytes, str, int, float, np.ndarray, torch.Tensor]


def default_cache_dir() -> Path:
    """``$XNORNET_CACHE``, else ``$XDG_CACHE_HOME/xnornet``, else ``~/.cache/xnornet``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "xnornet"


def resolve_cache_dir(override: Optional[Path] = None) -> Path:
    """``override`` (a --cache-dir flag) if given, else :func:`default_cache_dir`."""
    return Path(override).expanduser() if override is not None else default_cache_dir()


def check_outside(cache_dir: Path, data_root: Path) -> None:
    """Refuse a cache folder inside the data folder, which is never written to."""
    cache, root = Path(cache_dir).expanduser().resolve(), Path(data_root).expanduser().resolve()
    if cache == root or root in cache.parents:
        raise UserError(f"the cache folder {str(cache_dir)!r} is inside --data {str(data_root)!r}, which is never "
                        f"written to: choose another --cache-dir or ${CACHE_ENV}")


def fingerprint(*parts: Part) -> str:
    """SHA-256 (hex) of the parts, each tagged with its kind, dtype/shape and length."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().contiguous().numpy()
        if isinstance(part, np.ndarray):
            array = np.ascontiguousarray(part)
            tag = f"array:{array.dtype.str}:{array.shape}".encode()
            payload = memoryview(array).cast("B") if array.size else b""
        elif isinstance(part, bytes):
            tag, payload = b"bytes", part
        else:
            tag, payload = f"{type(part).__name__}".encode(), repr(part).encode()
        digest.update(tag + b":" + str(len(payload)).encode() + b":")
        digest.update(payload)
    return digest.hexdigest()


def load_entry(entry: Path, names: Sequence[str]) -> Optional[Dict[str, np.ndarray]]:
    """The arrays of a cache entry, or None when it is absent or unreadable (then it is recomputed)."""
    if not entry.is_dir():
        return None
    arrays = {}
    for name in names:
        try:
            arrays[name] = np.load(entry / f"{name}.npy", allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            LOG.warning("ignoring unreadable cache entry %s (%s)", entry, err)
            return None
    return arrays


def save_entry(entry: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` as ``entry/<name>.npy``, atomically: all of them or none."""
    parent = entry.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=parent))
    except OSError as err:
        raise UserError(
            f"cannot write the cache folder {str(parent)!r} ({err.strerror or err}); "
            f"point --cache-dir or ${CACHE_ENV} at a writable folder"
        ) from None
    try:
        for name, array in arrays.items():
            with open(staging / f"{name}.npy", "wb") as handle:
                np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
                handle.flush()
                os.fsync(handle.fileno())
        if entry.exists():  # an unreadable leftover: replace it
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.replace(staging, entry)
        except OSError:
            if not entry.is_dir():  # else a concurrent writer got there first: keep its entry
                raise
    except OSError as err:
        raise UserError(
            f"cannot write the cache entry {str(entry)!r} ({err.strerror or err}); "
            f"point --cache-dir or ${CACHE_ENV} at a writable folder with space"
        ) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
