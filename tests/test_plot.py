"""xnornet.plot on synthetic logs: a real PNG, the right curves, resumed logs, bad input."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, assert_one_line_error

from xnornet.cli import UserError
from xnornet.plot import get_args_parser, main, read_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def header(arch: str, **args) -> dict:
    return {"event": "start", "git_commit": "0" * 40, "args": {"arch": arch, **args}, "arch": arch}


def epoch(number: int, loss: float, acc: float, **extra) -> dict:
    return {"epoch": number, "lr": 0.01, "train_loss": loss, "train_acc": 90.0, "test_acc": acc, **extra}


def write_log(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def simple_log(path: Path, arch: str, seed: int, epochs: int = 5, **args) -> Path:
    records = [header(arch, seed=seed, **args)]
    records += [epoch(n, 1.0 / n, 90.0 + n + seed / 10) for n in range(1, epochs + 1)]
    return write_log(path, records)


def lines(figure, gid: str) -> list:
    return [line for ax in figure.axes for line in ax.get_lines() if line.get_gid() == gid]


def png_size(path: Path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def run_plot(*argv):
    return main(get_args_parser().parse_args([str(a) for a in argv]))


def test_two_runs_make_a_png_with_their_curves(tmp_path):
    xnor = simple_log(tmp_path / "a.jsonl", "LeNet_5", seed=1, recipe="ours")
    floating = simple_log(tmp_path / "b.jsonl", "LeNet_5_float", seed=1, recipe="ours")
    out = tmp_path / "figs" / "curves.png"
    figure = run_plot(xnor, floating, "-o", out)
    assert png_size(out) == (900, 450)
    assert len(lines(figure, "loss")) == 2
    assert len(lines(figure, "test_acc")) == 2
    references = lines(figure, "reference")
    assert sorted(line.get_ydata()[0] for line in references) == [99.23, 99.34]
    # each reference line takes the colour of its arch's curve
    curve_colour = {line.get_ydata()[0]: line.get_color() for line in references}
    xnor_curve, float_curve = lines(figure, "test_acc")
    assert curve_colour[99.23] == xnor_curve.get_color() and curve_colour[99.34] == float_curve.get_color()
    assert xnor_curve.get_color() != float_curve.get_color()
    labels = [text.get_text() for legend in figure.legends for text in legend.get_texts()]
    assert "LeNet_5 ours" in labels and "LeNet_5_float ours" in labels
    assert "2017 code, LeNet_5: 99.23" in labels


def test_seeds_share_one_legend_entry_and_unknown_arch_has_no_reference(tmp_path):
    logs = [simple_log(tmp_path / f"run-seed{s}.jsonl", "mystery", seed=s) for s in (1, 2, 3)]
    figure = run_plot(*logs, "-o", tmp_path / "c.png", "--ylim", "90", "100", "--size", "6", "3", "--dpi", "50")
    assert png_size(tmp_path / "c.png") == (300, 150)
    assert len(lines(figure, "test_acc")) == 3 and not lines(figure, "reference")
    labels = [text.get_text() for legend in figure.legends for text in legend.get_texts()]
    assert labels == ["run (seeds 1, 2, 3)"]  # the file name without its seed: no --recipe in these logs
    acc_ax = figure.axes[1]
    assert acc_ax.get_ylim() == (90.0, 100.0)
    assert acc_ax.get_ylabel() == "test accuracy (%)" and acc_ax.get_xlabel() == "epoch"


def test_explicit_labels_and_holdout_curves(tmp_path):
    records = [header("nin", seed=1)] + [epoch(n, 0.5, 80.0 + n, holdout_acc=79.0 + n) for n in (1, 2, 3)]
    log = write_log(tmp_path / "h.jsonl", records)
    other = simple_log(tmp_path / "o.jsonl", "nin", seed=2)
    figure = run_plot(log, other, "-o", tmp_path / "h.png", "--label", "with holdout", "--label", "plain")
    assert len(lines(figure, "holdout_acc")) == 1 and len(lines(figure, "test_acc")) == 2
    assert len(lines(figure, "reference")) == 1  # nin, once for both runs
    assert lines(figure, "reference")[0].get_color() == "0.25"  # grey: the nin curves have two colours
    labels = [text.get_text() for legend in figure.legends for text in legend.get_texts()]
    assert labels[:3] == ["with holdout", "with holdout, held-out", "plain"]


def test_a_resumed_log_gives_one_curve_keeping_the_last_record_per_epoch(tmp_path):
    records = [header("LeNet_5", seed=1), epoch(1, 0.3, 95.0), epoch(2, 0.2, 96.0), epoch(3, 0.15, 10.0),
               header("LeNet_5", seed=1, resume="last.pth"), epoch(3, 0.1, 97.0), epoch(4, 0.05, 98.0),
               {"event": "evaluate", "epoch": 4, "test_acc": 1.0}]
    log = write_log(tmp_path / "resumed.jsonl", records)
    run = read_run(log)
    assert run.test_acc == [(1, 95.0), (2, 96.0), (3, 97.0), (4, 98.0)]
    assert [e for e, _ in run.loss] == [1, 2, 3, 4]
    figure = run_plot(log, "-o", tmp_path / "r.png")
    (curve,) = lines(figure, "test_acc")
    assert list(curve.get_xdata()) == [1, 2, 3, 4]


def test_bad_input_is_one_clear_error(tmp_path):
    empty = write_log(tmp_path / "empty.jsonl", [header("LeNet_5")])
    with pytest.raises(UserError, match="no epoch record"):
        run_plot(empty, "-o", tmp_path / "x.png")
    good = simple_log(tmp_path / "g.jsonl", "LeNet_5", seed=1)
    with pytest.raises(UserError, match="give one per log"):
        run_plot(good, "-o", tmp_path / "x.png", "--label", "a", "--label", "b")
    with pytest.raises(UserError, match="LOW < HIGH"):
        run_plot(good, "-o", tmp_path / "x.png", "--ylim", "99", "98")
    (tmp_path / "broken.jsonl").write_text("{not json\n", encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "xnornet.plot", str(tmp_path / "broken.jsonl"),
                             "-o", str(tmp_path / "x.png")], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, "broken.jsonl", "not a readable JSON-lines log")
    assert not (tmp_path / "x.png").exists()
