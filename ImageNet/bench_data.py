"""CPU cost of the training input pipeline per image, for the README's epoch-time estimate.

    python ImageNet/bench_data.py --output ImageNet/logs/data_pipeline_cpu.jsonl

Times, on one process and one thread, (1) the ImageFolder path: open + decode a
synthetic 500x375 JPEG (about ImageNet's average size), resize to 256x256,
random crop 227, flip, normalize; (2) the Caffe path: parse a raw 3x256x256
Datum, subtract the mean, crop, flip. Appends a run header (git commit,
hardware) and one record per path to the JSON-lines log.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from caffe_lmdb import caffe_transform, decode_datum
from caffe_proto import Datum
from imagenet_data import folder_transform, load_rgb
from xnornet.cli import ArgumentParser, positive_int, run_cli, setup_logging
from xnornet.metrics import MetricsLog, run_header


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="time the ImageNet input pipeline per image on one CPU thread")
    parser.add_argument("--images", type=positive_int, default=200, metavar="N", help="images per path (default: 200)")
    parser.add_argument("--output", type=Path, required=True, metavar="FILE", help="JSON-lines log to append to")
    return parser


def natural_looking(rng: np.random.Generator, width: int = 500, height: int = 375) -> np.ndarray:
    """Smooth colour gradients plus mild noise: compresses like a photo, unlike pure noise."""
    y, x = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 2 * np.pi, size=3)
    image = np.stack([127 + 100 * np.sin(x / 37.0 + y / 53.0 + p) for p in phase], axis=-1)
    return np.clip(image + rng.normal(0, 8, size=image.shape), 0, 255).astype(np.uint8)


def time_per_image(fn, count: int) -> float:
    start = time.perf_counter()
    for index in range(count):
        fn(index)
    return 1000.0 * (time.perf_counter() - start) / count


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    log = MetricsLog(args.output)
    log.write(run_header(vars(args), script="ImageNet/bench_data.py"))
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for index in range(min(args.images, 20)):
            path = Path(tmp) / f"{index}.JPEG"
            Image.fromarray(natural_looking(rng)).save(path, quality=90)
            paths.append(str(path))
        transform = folder_transform(256, 227, train=True)
        folder_ms = time_per_image(lambda i: transform(load_rgb(paths[i % len(paths)])), args.images)
    raw = rng.integers(0, 256, size=(3, 256, 256), dtype=np.uint8)
    value = Datum(channels=3, height=256, width=256, data=raw.tobytes(), label=1).SerializeToString()
    caffe = caffe_transform(torch.zeros(3, 256, 256), 227, train=True)
    caffe_ms = time_per_image(lambda i: caffe(decode_datum(value, "bench")[0]), args.images)
    for layout, ms in (("imagefolder_jpeg_500x375", folder_ms), ("caffe_raw_datum_256", caffe_ms)):
        log.write({"layout": layout, "ms_per_image": ms, "images": args.images, "threads": 1})
        print(f"{layout}: {ms:.2f} ms per image on one thread")


if __name__ == "__main__":
    setup_logging()
    run_cli(main, get_args_parser().parse_args(sys.argv[1:]))
