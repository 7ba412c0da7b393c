"""Command-line plumbing shared by the recipes: one-line errors, logging setup."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, NoReturn, Optional, Sequence, Tuple, Union

LOG = logging.getLogger("xnornet")


class UserError(Exception):
    """Bad input (missing data, corrupt checkpoint, wrong flag): reported as one line, exit 1."""


class ParsedArgs(argparse.Namespace):
    """The parsed flags, plus ``given``: the dests of the flags written on the command line
    (a slot, so that ``vars(args)``, which logs and checkpoints record, does not hold it)."""

    __slots__ = ("given",)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.given: frozenset = frozenset()


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line on stderr (exit 2), no usage dump,
    knows named presets (``--recipe NAME``: sets of defaults that flags given on the
    command line still override) and records which flags were given (:class:`ParsedArgs`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.presets: Dict[str, Dict[str, Any]] = {}
        self.default_preset: Optional[str] = None

    def add_presets(self, presets: Mapping[str, Mapping[str, Any]], default: str, descriptions: Mapping[str, str]) -> None:
        """Add ``--recipe`` choosing one of ``presets`` (dest -> value, already typed)."""
        self.presets = {name: dict(values) for name, values in presets.items()}
        self.default_preset = default
        lines = "; ".join(f"{name}: {descriptions[name]}" for name in presets)
        self.add_argument("--recipe", choices=list(presets), default=default, metavar="NAME",
                          help=f"a named set of defaults, which flags given here still override ({lines}) "
                               f"(default: {default})")

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None) -> Tuple[Any, List[str]]:
        argv = list(sys.argv[1:] if args is None else args)
        if namespace is None:
            name = self.default_preset
            for index, item in enumerate(argv):
                if item == "--recipe" and index + 1 < len(argv):
                    name = argv[index + 1]
                elif item.startswith("--recipe="):
                    name = item.split("=", 1)[1]
            # Values already in the namespace are kept by argparse unless a flag sets them;
            # an unknown preset name is reported by --recipe's choices.
            namespace = ParsedArgs(**self.presets.get(name, {}) if name else {})
        parsed, extras = super().parse_known_args(argv, namespace)
        if isinstance(parsed, ParsedArgs):
            parsed.given = frozenset(self._given_dests(argv))
        return parsed, extras

    def _given_dests(self, argv: Sequence[str]) -> List[str]:
        """The dests of the optional flags in ``argv`` (exact or unambiguous prefix spellings)."""
        dests = []
        for item in argv:
            if item == "--":
                break
            if not item.startswith("-") or item == "-":
                continue
            option = item.split("=", 1)[0]
            action = self._option_string_actions.get(option)
            if action is None and option.startswith("--"):
                matches = {a for o, a in self._option_string_actions.items() if o.startswith(option)}
                action = matches.pop() if len(matches) == 1 else None
            if action is not None:
                dests.append(action.dest)
        return dests

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_in_range(minimum: int, wording: str, maximum: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[minimum, maximum]`` (no upper bound when ``maximum`` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wording}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {wording}, got {value}")
        return value

    return parse


def int_in_range(minimum: int, maximum: int, reason: str = "") -> Callable[[str], int]:
    """argparse type: an integer in ``[minimum, maximum]``; ``reason`` says why (``"the images are 28 px"``)."""
    why = f" ({reason})" if reason else ""
    return _int_in_range(minimum, f"an integer from {minimum} to {maximum}{why}", maximum)


#: argparse type: an integer > 0.
positive_int = _int_in_range(1, "a positive integer")
#: argparse type: an integer >= 0.
non_negative_int = _int_in_range(0, "an integer >= 0")
#: argparse type: a random seed, an integer in [0, 2**32) (the per-epoch seeds derived from it
#: must stay within the 64 bits of a torch.Generator seed).
seed_int = _int_in_range(0, f"an integer from 0 to {2**32 - 1}", 2**32 - 1)


def _float_where(accept: Callable[[float], bool], wording: str) -> Callable[[str], float]:
    """An argparse type: a float for which ``accept`` holds (``wording`` names the range)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wording}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {wording}, got {text}")
        return value

    return parse


#: argparse type: a finite float (no nan, no inf).
finite_float = _float_where(math.isfinite, "a finite number")
#: argparse type: a finite float > 0.
positive_float = _float_where(lambda v: v > 0 and math.isfinite(v), "a finite number > 0")
#: argparse type: a finite float >= 0.
non_negative_float = _float_where(lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0")
#: argparse type: a float in [0, 1].
unit_interval = _float_where(lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def setup_logging(verbose: bool = True) -> None:
    """Log lines to stderr; only rank 0 of a torchrun job logs at INFO."""
    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if verbose and rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)


def one_line(text: str, limit: Optional[int] = None) -> str:
    """``text`` on one line (its lines joined, runs of blanks made one); past ``limit``
    characters it is cut after the last whole sentence that fits (else the last whole word),
    so that what is kept still reads as complete."""
    flat = " ".join(text.split())
    if limit is None or len(flat) <= limit:
        return flat
    head = flat[:limit + 1]
    sentence_end = head.rfind(". ")
    if sentence_end > limit // 3:
        return head[:sentence_end + 1]
    return head[:limit].rsplit(" ", 1)[0] + " ..."


def check_file(path: Union[str, os.PathLike], what: str) -> Path:
    """``path`` as a Path if it is an existing regular file; else a :class:`UserError` that says
    what it is instead (missing, a directory, a device ...)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        raise UserError(f"{what} {str(path)!r} is a directory, not a file")
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} is not a regular file")
    return path


def check_writable_dir(path: Union[str, os.PathLike], flag: str) -> None:
    """Make sure that the folder ``path`` (given by ``flag``) exists and is writable, or can be
    created, without creating anything: its nearest existing ancestor must be a folder that
    takes a new file. Run it before slow work, so that a bad path fails at once."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():
            raise UserError(f"{flag} {path}: {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        if existing == path:
            raise UserError(f"{flag} {path} is a file, not a folder")
        raise UserError(f"{flag} {path}: {existing} is a file, so no folder can be made under it")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        where = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise UserError(f"{flag} {path} {where} ({err.strerror or err})") from None


def check_output_file(path: Union[str, os.PathLike], flag: str) -> Path:
    """``path`` as a Path if a file can be written there (given by ``flag``): not a folder, in a
    folder that exists and is writable or can be created."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory: give a file name")
    check_writable_dir(path.parent, f"{flag} {path}: its folder")
    return path


def run_cli(main: Callable[[Any], Any], args: Any) -> None:
    """Run ``main(args)``; a :class:`UserError` becomes one line on stderr and exit status 1
    (a message of several lines is joined into one)."""
    try:
        main(args)
    except UserError as err:
        sys.stderr.write(f"error: {one_line(str(err)) or type(err).__name__}\n")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: checkpoints already written are kept\n")
        sys.exit(130)
