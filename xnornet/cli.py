"""Command-line plumbing shared by the recipes: one-line errors, logging setup."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable, NoReturn

LOG = logging.getLogger("xnornet")


class UserError(Exception):
    """Bad input (missing data, corrupt checkpoint, wrong flag): reported as one line, exit 1."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line on stderr (exit 2), no usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_at_least(minimum: int, wording: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wording}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {wording}, got {value}")
        return value

    return parse


#: argparse type: an integer > 0.
positive_int = _int_at_least(1, "a positive integer")
#: argparse type: an integer >= 0.
non_negative_int = _int_at_least(0, "an integer >= 0")


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def setup_logging(verbose: bool = True) -> None:
    """Log lines to stderr; only rank 0 of a torchrun job logs at INFO."""
    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if verbose and rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)


def run_cli(main: Callable[[Any], Any], args: Any) -> None:
    """Run ``main(args)``; a :class:`UserError` becomes one line on stderr and exit status 1."""
    try:
        main(args)
    except UserError as err:
        sys.stderr.write(f"error: {err}\n")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: checkpoints already written are kept\n")
        sys.exit(130)
