"""Fetching a dataset with torchvision (``--download``), with one-line errors."""

from __future__ import annotations

from pathlib import Path

from .cli import UserError, one_line


def torchvision_download(dataset_name: str, root: Path) -> None:
    """Download both splits of ``torchvision.datasets.<dataset_name>`` into ``root``."""
    from torchvision import datasets

    dataset_class = getattr(datasets, dataset_name)
    try:
        for train in (True, False):
            dataset_class(str(root), train=train, download=True)
    except Exception as err:  # network or disk errors, reported as one line
        message = one_line(str(err), 240) or type(err).__name__
        raise UserError(f"--download of {dataset_name} into {root} failed: {message}") from None
