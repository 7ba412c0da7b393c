"""Check the three CIFAR-10 readers and the GCN+ZCA preprocessing on the real binary version.

    python CIFAR_10/verify_data.py --data /path/holding/cifar-10-batches-bin

1. reads the binary version and records counts, first labels and channel statistics;
2. converts it to the python (pickle) layout and to the npy layout in a temporary
   folder and checks that those readers give identical images and labels;
3. computes GCN+ZCA (through the recipe's cache), stores it as the 2017 npy
   layout, reads it back, and checks the whitening: the whitened training
   covariance must equal ``V diag(lambda / (lambda + filter_bias)) V^T`` (near the
   identity where lambda >> filter_bias), its largest off-diagonal entry and
   diagonal range are recorded; the same with a tiny filter bias (1e-5) shows
   how close plain whitening gets to the identity.

Every check is one JSON line in ``--log`` (after a header with git commit and
hardware); the exit status is 1 if any check fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from cifar_data import load_cifar10
from cifar_protocol import channel_stats
from cifar_write import write_npy_layout, write_py_layout
from gcn_zca import GCN_SCALE, ZCA_FILTER_BIAS, cached_gcn_zca, fit_zca, global_contrast_normalize
from xnornet.cache import check_outside, resolve_cache_dir
from xnornet.cli import ArgumentParser, UserError, run_cli, setup_logging
from xnornet.metrics import MetricsLog, run_header

RECIPE_DIR = Path(__file__).resolve().parent
LOG = logging.getLogger("xnornet")
#: A nearly unregularized ZCA, to show the whitening itself reaches the identity.
SMALL_FILTER_BIAS = 1e-5


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Verify the CIFAR-10 readers and GCN+ZCA on the real binary version")
    parser.add_argument("--data", type=Path, default=Path("./data"), metavar="DIR",
                        help="folder holding cifar-10-batches-bin/ (default: ./data)")
    parser.add_argument("--log", type=Path, default=RECIPE_DIR / "logs" / "verify_data.jsonl", metavar="FILE",
                        help="JSON-lines output, replaced if it exists (default: CIFAR_10/logs/verify_data.jsonl)")
    parser.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                        help="GCN+ZCA cache (default: $XNORNET_CACHE or ~/.cache/xnornet)")
    parser.add_argument("--tmp-dir", type=Path, default=None, metavar="DIR",
                        help="where the converted layouts are written and then deleted (default: system temp)")
    return parser


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a, b))


def covariance(rows: torch.Tensor) -> torch.Tensor:
    """Covariance of the rows (float64, divided by N), accumulated chunk by chunk."""
    mean = rows.double().mean(dim=0)
    total = torch.zeros(rows.size(1), rows.size(1), dtype=torch.float64)
    for chunk in rows.split(4096):
        centered = chunk.double() - mean
        total += centered.T @ centered
    return total / rows.size(0)


def off_diagonal_max(matrix: torch.Tensor) -> float:
    return float((matrix - torch.diag(torch.diagonal(matrix))).abs().max())


def whitening_checks(raw: Any, train_w: np.ndarray, test_w: np.ndarray) -> Dict[str, Any]:
    """GCN and ZCA statistics of the real training set."""
    rows = torch.from_numpy(raw.train_images).reshape(len(raw.train_images), -1)
    gcn = torch.cat([global_contrast_normalize(chunk.double()).float() for chunk in rows.split(4096)])
    norms = gcn.double().norm(dim=1)
    zca = fit_zca(gcn)
    fresh = zca.apply(gcn)
    cov_gcn = covariance(gcn)
    whitened = torch.from_numpy(train_w).reshape(len(train_w), -1)
    cov_w = covariance(whitened)
    # W C W = V diag(lambda / (lambda + b)) V^T: what the whitened covariance must be.
    expected = zca.matrix @ cov_gcn @ zca.matrix
    diag = torch.diagonal(cov_w)
    test_cov = covariance(torch.from_numpy(test_w).reshape(len(test_w), -1))
    eig = zca.eigenvalues
    # Nearly unregularized ZCA: the whitened covariance approaches I - 11^T / D, the identity
    # except on the all-ones direction that GCN's per-image mean subtraction removed.
    small = fit_zca(gcn, filter_bias=SMALL_FILTER_BIAS)
    cov_small = covariance(small.apply(gcn))
    expected_small = small.matrix @ cov_gcn @ small.matrix
    dim = cov_small.size(0)
    target = torch.eye(dim, dtype=torch.float64) - 1.0 / dim
    return {
        "gcn_row_mean_max_abs": float(gcn.double().mean(dim=1).abs().max()),
        "gcn_row_norm_min": float(norms.min()), "gcn_row_norm_max": float(norms.max()), "gcn_scale": GCN_SCALE,
        "zca_filter_bias": ZCA_FILTER_BIAS,
        "eigenvalues_min": float(eig.min()), "eigenvalues_max": float(eig.max()),
        "eigenvalues_above_filter_bias": int((eig > ZCA_FILTER_BIAS).sum()), "dimensions": int(eig.numel()),
        "cache_vs_fresh_max_abs": float((fresh - whitened).abs().max()),
        "whitened_train_mean_max_abs": float(whitened.double().mean(dim=0).abs().max()),
        "whitened_train_cov_offdiag_max_abs": off_diagonal_max(cov_w),
        "whitened_train_cov_diag_min": float(diag.min()), "whitened_train_cov_diag_max": float(diag.max()),
        "whitened_train_cov_vs_theory_max_abs": float((cov_w - expected).abs().max()),
        "theory_diag_min": float(torch.diagonal(expected).min()),
        "theory_diag_max": float(torch.diagonal(expected).max()),
        "whitened_train_cov_eig_max": float(torch.linalg.eigvalsh(cov_w).max()),
        "whitened_test_cov_offdiag_max_abs": off_diagonal_max(test_cov),
        "whitened_test_cov_diag_min": float(torch.diagonal(test_cov).min()),
        "whitened_test_cov_diag_max": float(torch.diagonal(test_cov).max()),
        "eigenvalues_smallest_5": eig[:5].tolist(),
        "small_bias": SMALL_FILTER_BIAS,
        "small_bias_cov_vs_theory_max_abs": float((cov_small - expected_small).abs().max()),
        "small_bias_cov_offdiag_max_abs": off_diagonal_max(cov_small),
        "small_bias_cov_diag_min": float(torch.diagonal(cov_small).min()),
        "small_bias_cov_diag_max": float(torch.diagonal(cov_small).max()),
        "small_bias_cov_vs_identity_minus_ones_over_d_max_abs": float((cov_small - target).abs().max()),
    }


def main(args: argparse.Namespace) -> bool:
    start = time.perf_counter()
    args.log.parent.mkdir(parents=True, exist_ok=True)
    if args.log.exists():
        args.log.unlink()
    log = MetricsLog(args.log)
    log.write(run_header(vars(args), script="CIFAR_10/verify_data.py"))
    all_ok = True

    def record(check: str, ok: bool, **values: Any) -> None:
        nonlocal all_ok
        all_ok = all_ok and ok
        log.write({"check": check, "ok": ok, **values})
        LOG.info("%s %s %s", "ok  " if ok else "FAIL", check, json.dumps(values)[:300])

    raw = load_cifar10(args.data, "bin")
    mean, std = channel_stats(raw.train_images)
    record("binary_version", len(raw.train_labels) == 50000 and len(raw.test_labels) == 10000,
           folder=str(raw.folder), md5={p.name: md5(p) for p in sorted(raw.folder.glob("*.bin"))},
           train=len(raw.train_labels), test=len(raw.test_labels),
           train_per_class=np.bincount(raw.train_labels, minlength=10).tolist(),
           test_per_class=np.bincount(raw.test_labels, minlength=10).tolist(),
           train_first_labels=raw.train_labels[:10].tolist(), test_first_labels=raw.test_labels[:10].tolist(),
           channel_mean=[round(v, 4) for v in mean.tolist()], channel_std=[round(v, 4) for v in std.tolist()])

    cache_dir = resolve_cache_dir(args.cache_dir)
    check_outside(cache_dir, args.data)
    train_w, test_w = cached_gcn_zca(raw.train_images, raw.test_images, cache_dir)
    with tempfile.TemporaryDirectory(dir=args.tmp_dir, prefix="cifar-verify-") as tmp:
        tmp_path = Path(tmp)
        train, test = (raw.train_images, raw.train_labels), (raw.test_images, raw.test_labels)
        write_py_layout(tmp_path / "py", train, test)
        py = load_cifar10(tmp_path / "py", "auto")
        record("py_layout_equals_bin", py.layout == "py" and all(
            same(a, b) for a, b in ((py.train_images, raw.train_images), (py.train_labels, raw.train_labels),
                                    (py.test_images, raw.test_images), (py.test_labels, raw.test_labels))),
               layout=py.layout)

        write_npy_layout(tmp_path / "npy_pixels", train, test, suffix=False)
        npy = load_cifar10(tmp_path / "npy_pixels", "auto")
        record("npy_layout_equals_bin", npy.layout == "npy" and all(
            same(a, b) for a, b in ((npy.train_images, raw.train_images.astype(np.float32)),
                                    (npy.train_labels, raw.train_labels),
                                    (npy.test_images, raw.test_images.astype(np.float32)),
                                    (npy.test_labels, raw.test_labels))),
               layout=npy.layout, suffix=False)

        write_npy_layout(tmp_path / "npy_gcn_zca", (train_w, raw.train_labels), (test_w, raw.test_labels),
                         suffix=True)
        whitened = load_cifar10(tmp_path / "npy_gcn_zca", "npy")
        record("npy_gcn_zca_roundtrip", same(whitened.train_images, train_w) and same(whitened.test_images, test_w)
               and same(whitened.train_labels, raw.train_labels), suffix=True,
               train_shape=list(train_w.shape), dtype=str(train_w.dtype))

    stats = whitening_checks(raw, train_w, test_w)
    ok = (stats["gcn_row_mean_max_abs"] < 1e-4 and abs(stats["gcn_row_norm_min"] - GCN_SCALE) < 1e-3
          and abs(stats["gcn_row_norm_max"] - GCN_SCALE) < 1e-3 and stats["cache_vs_fresh_max_abs"] < 1e-4
          and stats["whitened_train_cov_vs_theory_max_abs"] < 1e-3 and stats["whitened_train_cov_eig_max"] < 1.0
          and stats["small_bias_cov_vs_theory_max_abs"] < 1e-2)
    record("gcn_zca_statistics", ok, **stats)
    record("summary", all_ok, seconds=round(time.perf_counter() - start, 1))
    print(f"verify_data: {'all checks passed' if all_ok else 'SOME CHECKS FAILED'}; log in {args.log}")
    if not all_ok:
        raise UserError(f"some checks failed, see {args.log}")
    return all_ok


if __name__ == "__main__":
    setup_logging()
    run_cli(main, get_args_parser().parse_args(sys.argv[1:]))
