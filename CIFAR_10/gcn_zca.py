"""Global contrast normalization and ZCA whitening: how the 2017 CIFAR-10 arrays were made.

The 2017 recipe trained on the output of pylearn2's ``make_cifar10_gcn_whitened``:
GCN with ``scale=55`` on every image, then ZCA with ``filter_bias=0.1`` fitted
on the training set and applied to both sets. The definitions (our own code):

- GCN, per image (row) ``x`` of D values: ``x <- x - mean(x)``, then
  ``x <- x / (sqrt(sqrt_bias + sum(x**2)) / scale)``, where a divisor below
  ``min_divisor`` is replaced by 1. With ``use_std`` the sum of squares is replaced
  by the variance (ddof = 1).
- ZCA, fitted on N training rows: ``mu = mean of rows``, ``C = (X-mu)^T (X-mu) / N``,
  ``C = V diag(lambda) V^T``, ``W = V diag(1 / sqrt(lambda + filter_bias)) V^T``;
  applied as ``(X - mu) W``. The whitened training covariance is then
  ``V diag(lambda / (lambda + filter_bias)) V^T``: the identity as filter_bias -> 0.

The result is cached (see :mod:`xnornet.cache`), keyed by the raw pixels, the
parameters and :data:`PREPROCESS_VERSION`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from xnornet.cache import fingerprint, load_entry, save_entry

LOG = logging.getLogger("xnornet")

GCN_SCALE = 55.0
GCN_SQRT_BIAS = 0.0
GCN_MIN_DIVISOR = 1e-8
ZCA_FILTER_BIAS = 0.1
#: Bump when the code below changes its results: older cache entries are then ignored.
PREPROCESS_VERSION = 1
CHUNK_ROWS = 4096


def global_contrast_normalize(
    x: torch.Tensor,
    scale: float = GCN_SCALE,
    subtract_mean: bool = True,
    use_std: bool = False,
    sqrt_bias: float = GCN_SQRT_BIAS,
    min_divisor: float = GCN_MIN_DIVISOR,
) -> torch.Tensor:
    """GCN of each row of ``x`` [N, D] (see the module docstring); returns a new tensor."""
    if x.dim() != 2:
        raise ValueError(f"expected a matrix [N, D], got shape {tuple(x.shape)}")
    x = x - x.mean(dim=1, keepdim=True) if subtract_mean else x.clone()
    spread = x.var(dim=1, correction=1) if use_std else x.square().sum(dim=1)
    normalizers = torch.sqrt(sqrt_bias + spread) / scale
    normalizers = torch.where(normalizers < min_divisor, torch.ones_like(normalizers), normalizers)
    return x / normalizers[:, None]


@dataclass
class ZCA:
    """A fitted ZCA transform: ``(x - mean) @ matrix``; ``eigenvalues`` of the training covariance."""

    mean: torch.Tensor  # [D], float64
    matrix: torch.Tensor  # [D, D], float64, symmetric
    eigenvalues: torch.Tensor  # [D], float64, ascending
    filter_bias: float

    def apply(self, x: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
        """Whiten the rows of ``x`` [N, D]; float32 result, computed in float32 chunks."""
        mean = self.mean.to(x.device, torch.float32)
        matrix = self.matrix.to(x.device, torch.float32)
        return torch.cat([(rows.float() - mean) @ matrix for rows in x.split(chunk_rows)]) if len(x) else x.float()


def fit_zca(
    x: torch.Tensor, filter_bias: float = ZCA_FILTER_BIAS, chunk_rows: int = CHUNK_ROWS, method: str = "auto"
) -> ZCA:
    """Fit ZCA on the rows of ``x`` [N, D] in float64.

    ``method``: ``covariance`` eigendecomposes the D x D covariance (accumulated
    chunk by chunk); ``gram`` the N x N Gram matrix, which has the same nonzero
    eigenvalues and gives the same transform (all other eigenvalues are 0), much
    faster when N < D; ``auto`` picks the smaller one.
    """
    if x.dim() != 2 or x.size(0) == 0:
        raise ValueError(f"expected a non-empty matrix [N, D], got shape {tuple(x.shape)}")
    count, dim = x.shape
    mean = torch.zeros(dim, dtype=torch.float64, device=x.device)
    for rows in x.split(chunk_rows):
        mean += rows.double().sum(dim=0)
    mean /= count
    if method == "auto":
        method = "gram" if count < dim else "covariance"
    if method == "covariance":
        covariance = torch.zeros(dim, dim, dtype=torch.float64, device=x.device)
        for rows in x.split(chunk_rows):
            centered = rows.double() - mean
            covariance += centered.T @ centered
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance / count)
        # Rounding can leave eigenvalues of a singular covariance slightly below 0.
        eigenvalues = eigenvalues.clamp(min=0.0)
        if not bool((eigenvalues + filter_bias > 0).all()):
            raise ValueError("the covariance is singular: ZCA needs filter_bias > 0")
        matrix = (eigenvectors * torch.rsqrt(eigenvalues + filter_bias)) @ eigenvectors.T
    elif method == "gram":
        centered = x.double() - mean
        values, vectors = torch.linalg.eigh(centered @ centered.T / count)
        keep = values > values.max().clamp(min=0.0) * dim * torch.finfo(torch.float64).eps
        values = values[keep]
        if keep.sum() < dim and not filter_bias > 0:
            raise ValueError("the covariance is singular: ZCA needs filter_bias > 0")
        # Unit eigenvectors of the covariance: X^T u / sqrt(N lambda) for each Gram eigenpair (lambda, u).
        basis = centered.T @ vectors[:, keep] / torch.sqrt(values * count)
        # On the null space of the covariance the transform is the scalar 1/sqrt(filter_bias).
        null_scale = filter_bias ** -0.5 if filter_bias > 0 else 0.0
        matrix = null_scale * torch.eye(dim, dtype=torch.float64, device=x.device) + (
            basis * (torch.rsqrt(values + filter_bias) - null_scale)) @ basis.T
        eigenvalues = torch.cat([torch.zeros(dim - len(values), dtype=torch.float64, device=x.device), values])
    else:
        raise ValueError(f"unknown method {method!r}")
    return ZCA(mean=mean, matrix=matrix, eigenvalues=eigenvalues, filter_bias=filter_bias)


def gcn_zca(
    train: torch.Tensor, test: torch.Tensor, device: Optional[torch.device] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The 2017 preprocessing of image batches [N, C, H, W] (any numeric dtype): float32 results, same shapes."""
    device = device if device is not None else torch.device("cpu")

    def gcn(images: torch.Tensor) -> torch.Tensor:
        rows = images.reshape(images.size(0), -1)
        return torch.cat([global_contrast_normalize(chunk.to(device).double()).float()
                          for chunk in rows.split(CHUNK_ROWS)]) if len(rows) else rows.float().to(device)

    train_rows, test_rows = gcn(train), gcn(test)
    zca = fit_zca(train_rows)
    return zca.apply(train_rows).reshape(train.shape), zca.apply(test_rows).reshape(test.shape)


def cached_gcn_zca(
    train: np.ndarray, test: np.ndarray, cache_dir: Path, device: Optional[torch.device] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`gcn_zca` of uint8 images, computed once and kept in ``cache_dir``."""
    key = fingerprint("cifar10-gcn-zca", PREPROCESS_VERSION, GCN_SCALE, GCN_SQRT_BIAS, GCN_MIN_DIVISOR,
                      ZCA_FILTER_BIAS, train, test)
    entry = Path(cache_dir) / f"cifar10-gcn-zca-{key[:32]}"
    cached = load_entry(entry, ("train", "test"))
    if cached is not None and cached["train"].shape == train.shape and cached["test"].shape == test.shape:
        LOG.info("GCN+ZCA data from the cache %s", entry)
        return cached["train"], cached["test"]
    LOG.info("computing GCN (scale %g) + ZCA (filter bias %g) of %d training and %d test images...",
             GCN_SCALE, ZCA_FILTER_BIAS, len(train), len(test))
    start = time.perf_counter()
    train_out, test_out = gcn_zca(torch.from_numpy(train), torch.from_numpy(test), device)
    arrays = {"train": train_out.cpu().numpy(), "test": test_out.cpu().numpy()}
    save_entry(entry, arrays)
    LOG.info("GCN+ZCA took %.1fs; cached in %s", time.perf_counter() - start, entry)
    return arrays["train"], arrays["test"]
