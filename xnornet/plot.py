"""Training curves from recipe logs: train loss and test accuracy per epoch, one or more runs.

    python -m xnornet.plot MNIST/logs/LeNet_5-shift2-cosine-seed*.jsonl -o curves.png

Each run is labelled by its arch and ``--recipe`` preset (or its file name when the log
predates presets), or by ``--label``; runs with the same label (seeds of one recipe) share a
colour and one legend entry. The 2017 code's figure for the arch is drawn as a dashed line.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from .cli import ArgumentParser, UserError, check_output_file, finite_float, positive_float, positive_int, run_cli
from .metrics import read_run_log
from .summarize import run_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Test accuracy (%, top-1) of the 2017 code, by --arch.
REFERENCE_ACC: Dict[str, float] = {
    "LeNet_5": 99.23,
    "LeNet_5_float": 99.34,
    "nin": 86.28,
    "nin_float": 89.67,
    "alexnet": 44.87,
}

_SEED_SUFFIX = re.compile(r"[-_ ,]*seed\s*\d+$")


@dataclass
class Run:
    """The curves of one training log."""

    path: Path
    arch: str
    label: str
    seed: Optional[int] = None
    loss: List[Tuple[int, float]] = field(default_factory=list)  # (epoch, train loss)
    test_acc: List[Tuple[int, float]] = field(default_factory=list)
    holdout_acc: List[Tuple[int, float]] = field(default_factory=list)


def default_label(path: Path, args: Dict[str, Any], arch: str) -> str:
    """``arch preset`` when the log names its preset, else the run's name without its seed."""
    if args.get("recipe"):
        return f"{arch} {args['recipe']}"
    return _SEED_SUFFIX.sub("", run_name(path)) or arch


def read_run(path: Path, label: Optional[str] = None) -> Run:
    """Parse a log's run (:func:`xnornet.metrics.read_run_log`: its first header gives arch and
    arguments; resumed runs' headers are skipped, and an epoch logged twice keeps its last record)."""
    headers, records = read_run_log(path)
    args = (headers[0].get("args") or {}) if headers else {}
    arch = str(args.get("arch") or (headers[0].get("arch") if headers else None) or "?")
    by_epoch = {int(record["epoch"]): record for record in records
                if "train_loss" in record or "test_acc" in record}
    if not by_epoch:
        raise UserError(f"{path} holds no epoch record (is it a training log?)")
    run = Run(path=path, arch=arch, label=label or default_label(path, args, arch),
              seed=args.get("seed"))
    for epoch in sorted(by_epoch):
        record = by_epoch[epoch]
        for key, points in (("train_loss", run.loss), ("test_acc", run.test_acc), ("holdout_acc", run.holdout_acc)):
            if isinstance(record.get(key), (int, float)):
                points.append((epoch, float(record[key])))
    return run


def _matplotlib() -> Tuple[Any, Any]:
    """matplotlib's Figure with the Agg canvas (no display, no pyplot state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None
    return Figure, FigureCanvasAgg


def check_image_path(path: Path) -> None:
    """``-o``: a file whose suffix names an image format matplotlib writes, in a writable folder
    (checked before any log is read; matplotlib would add ``.png`` to a name without suffix)."""
    check_output_file(path, "-o/--output")
    figure_class, canvas_class = _matplotlib()
    formats = canvas_class(figure_class()).get_supported_filetypes()
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        shown = "no suffix" if not suffix else f"suffix .{suffix}"
        raise UserError(f"-o/--output {path} has {shown}: name an image file, e.g. curves.png "
                        f"(formats: {', '.join(sorted(formats))})")


def _legend_text(label: str, runs: Sequence[Run]) -> str:
    seeds = [run.seed for run in runs if run.seed is not None]
    if len(runs) > 1 and len(seeds) == len(runs):
        return f"{label} (seeds {', '.join(map(str, seeds))})"
    if len(runs) > 1:
        return f"{label} ({len(runs)} runs)"
    return label


def plot_runs(runs: Sequence[Run], *, ylim: Optional[Tuple[float, float]] = None, title: Optional[str] = None,
              size: Tuple[float, float] = (9.0, 4.5), dpi: float = 100) -> Figure:
    """A two-panel figure (train loss, test accuracy) of ``runs``; returns the matplotlib Figure.

    Lines carry a gid: ``loss``, ``test_acc``, ``holdout_acc`` for curves, ``reference`` for
    the 2017 figures.
    """
    figure_class, canvas_class = _matplotlib()
    figure = figure_class(figsize=size, dpi=dpi, layout="constrained")
    canvas_class(figure)
    loss_ax, acc_ax = figure.subplots(1, 2)
    groups: Dict[str, List[Run]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    colours = [f"C{index % 10}" for index in range(len(groups))]
    arch_colours: Dict[str, List[str]] = {}
    for colour, (label, members) in zip(colours, groups.items()):
        legend = _legend_text(label, members)
        for index, run in enumerate(members):
            if colour not in arch_colours.setdefault(run.arch, []):
                arch_colours[run.arch].append(colour)
            shown = legend if index == 0 else "_nolegend_"
            if run.loss:
                epochs, values = zip(*run.loss)
                loss_ax.plot(epochs, values, color=colour, lw=1.2, alpha=0.85, label=shown, gid="loss")
            if run.test_acc:
                epochs, values = zip(*run.test_acc)
                acc_ax.plot(epochs, values, color=colour, lw=1.2, alpha=0.85, label=shown, gid="test_acc")
            if run.holdout_acc:
                epochs, values = zip(*run.holdout_acc)
                acc_ax.plot(epochs, values, color=colour, lw=1.0, ls=":", alpha=0.85,
                            label=f"{label}, held-out" if index == 0 else "_nolegend_", gid="holdout_acc")
    for arch, used in arch_colours.items():
        if arch in REFERENCE_ACC:
            # The colour of the arch's curves when they are one group, else a neutral grey.
            acc_ax.axhline(REFERENCE_ACC[arch], color=used[0] if len(used) == 1 else "0.25", ls="--", lw=1.0,
                           label=f"2017 code, {arch}: {REFERENCE_ACC[arch]:.2f}", gid="reference")
    all_losses = [value for run in runs for _, value in run.loss]
    if all_losses and min(all_losses) > 0:
        loss_ax.set_yscale("log")
        loss_ax.set_ylabel("train loss (log scale)")
    else:
        loss_ax.set_ylabel("train loss")
    acc_ax.set_ylabel("test accuracy (%)")
    if ylim is not None:
        acc_ax.set_ylim(*ylim)
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("epoch")
        ax.grid(True, which="major", alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        figure.suptitle(title)
    handles, labels = acc_ax.get_legend_handles_labels()
    if handles:
        # Up to three entries in one row, else two rows (filled column by column).
        columns = len(handles) if len(handles) <= 3 else min(4, -(-len(handles) // 2))
        figure.legend(handles, labels, loc="outside lower center", ncol=columns, frameon=False)
    return figure


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m xnornet.plot", description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", type=Path, help="log.jsonl files written by a recipe")
    parser.add_argument("-o", "--output", type=Path, default=Path("curves.png"),
                        help="the image to write; its suffix chooses the format (default: curves.png)")
    parser.add_argument("--label", action="append", default=None, metavar="TEXT",
                        help="the legend label of each log, in order (give it once per log); equal labels "
                             "share a colour and one legend entry")
    parser.add_argument("--ylim", type=finite_float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="the range of the accuracy axis (default: fit the curves)")
    parser.add_argument("--title", default=None, help="a title above the two panels")
    parser.add_argument("--size", type=positive_float, nargs=2, default=(9.0, 4.5), metavar=("W", "H"),
                        help="figure size in inches (default: 9 4.5)")
    parser.add_argument("--dpi", type=positive_int, default=100, help="pixels per inch (default: 100)")
    return parser


def main(args: argparse.Namespace) -> Figure:
    """Read the logs, draw them, write ``args.output``; returns the matplotlib Figure."""
    if args.label is not None and len(args.label) != len(args.logs):
        raise UserError(f"--label was given {len(args.label)} times for {len(args.logs)} logs: give one per log")
    if args.ylim is not None and not args.ylim[0] < args.ylim[1]:
        raise UserError(f"--ylim needs LOW < HIGH, got {args.ylim[0]} {args.ylim[1]}")
    check_image_path(args.output)
    labels = args.label or [None] * len(args.logs)
    runs = [read_run(path, label) for path, label in zip(args.logs, labels)]
    figure = plot_runs(runs, ylim=tuple(args.ylim) if args.ylim else None, title=args.title,
                       size=tuple(args.size), dpi=args.dpi)
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(args.output)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot write {args.output} ({err})") from None
    print(f"wrote {args.output} ({len(runs)} run(s))")
    return figure


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args(sys.argv[1:]))
