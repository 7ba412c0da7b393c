"""The three recipes' flags: a shared flag is spelled, typed, defaulted and documented the same
everywhere (one definition in xnornet.recipe); numeric flags are checked when parsed."""

from __future__ import annotations

import argparse
import sys
from typing import Dict

import pytest

from conftest import REPO_ROOT, load_module
from imagenet_fixtures import recipe_main as imagenet_main  # also puts ImageNet/ on sys.path

sys.path.insert(0, str(REPO_ROOT / "MNIST"))
sys.path.insert(0, str(REPO_ROOT / "CIFAR_10"))

import alexnet  # noqa: E402
import lenet  # noqa: E402
import nin  # noqa: E402
from xnornet.checkpoint import arch_mismatch, recipe_of_arch  # noqa: E402
from xnornet.cli import finite_float, int_in_range, seed_int  # noqa: E402

#: Flags whose help text differs by recipe on purpose (its networks, data layout, presets).
RECIPE_WORDED = {"arch", "data", "download", "recipe"}
#: One name, two recipe-specific flags: --lr-epochs follows each 2017 code's own epoch count
#: (MNIST's lr drops at epochs N, 2N, ...; ImageNet's, counted from 0 in 2017, at N+1, 2N+1, ...).
RECIPE_SPECIFIC = {"lr_epochs"}


def load(script: str):
    return load_module(script, f"flags_{script.split('/')[0]}")


@pytest.fixture(scope="module")
def parsers() -> Dict[str, argparse.ArgumentParser]:
    return {"MNIST": load("MNIST/main.py").get_args_parser(),
            "CIFAR_10": load("CIFAR_10/main.py").get_args_parser(),
            "ImageNet": imagenet_main().get_args_parser()}


def actions(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.option_strings and action.dest != "help"}


def group_of(parser: argparse.ArgumentParser, dest: str) -> str:
    for group in parser._action_groups:
        if any(action.dest == dest for action in group._group_actions):
            return group.title
    raise KeyError(dest)


def test_every_flag_two_recipes_have_is_the_same_flag(parsers) -> None:
    by_recipe = {name: actions(parser) for name, parser in parsers.items()}
    names = list(by_recipe)
    shared = set.union(*[set(by_recipe[a]) & set(by_recipe[b]) for a in names for b in names if a < b])
    shared -= RECIPE_SPECIFIC
    assert {"cpu", "arch", "data", "test_batch_size", "epochs", "lr", "weight_decay", "seed"} <= shared
    for dest in sorted(shared):
        having = [name for name in names if dest in by_recipe[name]]
        first = by_recipe[having[0]][dest]
        for name in having[1:]:
            other = by_recipe[name][dest]
            assert other.option_strings == first.option_strings, (dest, name)
            assert other.type is first.type and type(other) is type(first), (dest, name)
            assert group_of(parsers[name], dest) == group_of(parsers[having[0]], dest), (dest, name)
            if dest not in RECIPE_WORDED:  # defaults may differ (the 2017 recipes did), the words around them not
                assert first.help.split("(default")[0] == other.help.split("(default")[0], (dest, name)


def test_device_arch_and_data_flags_in_every_recipe(parsers) -> None:
    for name, parser in parsers.items():
        for spelling in ("--cpu", "--no-cuda"):
            assert parser.parse_args([spelling]).cpu is True, (name, spelling)
        assert parser.parse_args([]).cpu is False
        assert parser.parse_args(["-a", parser.get_default("arch")]).arch == parser.get_default("arch")
        for dest in ("data", "test_batch_size"):
            assert group_of(parser, dest) == "data", (name, dest)
        assert not hasattr(parser.parse_args([]), "no_cuda")
    assert parsers["MNIST"].parse_args(["--train-subset", "5", "--test-subset", "3"]).train_subset == 5
    assert parsers["CIFAR_10"].parse_args(["--test-subset", "3"]).test_subset == 3
    assert "train_subset" not in actions(parsers["ImageNet"])  # image folders: no tensors to cut
    assert "--download" in parsers["MNIST"].format_help() and "--download" not in parsers["ImageNet"].format_help()


def test_defaults_are_the_recipes_own(parsers) -> None:
    defaults = {name: parser.parse_args([]) for name, parser in parsers.items()}
    assert [defaults[n].test_batch_size for n in ("MNIST", "CIFAR_10", "ImageNet")] == [128, 100, None]
    assert [defaults[n].epochs for n in ("MNIST", "CIFAR_10", "ImageNet")] == [60, 319, 100]
    assert "counting the epochs a --resume checkpoint already trained" in actions(parsers["MNIST"])["epochs"].help


@pytest.mark.parametrize("argv, flag", [
    (["--lr", "-1"], "--lr"), (["--lr", "0"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--weight-decay", "-1"], "--weight-decay"), (["--wd", "nan"], "--wd"), (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"), (["--grad-scale", "inf"], "--grad-scale"), (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"), (["--test-batch-size", "0"], "--test-batch-size"),
    (["--distill-weight", "1.5"], "--distill-weight"), (["--checkpoint-minutes", "-1"], "--checkpoint-minutes"),
])
def test_numeric_flags_are_checked_when_parsed(parsers, capsys, argv, flag) -> None:
    for name, parser in parsers.items():
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(argv)
        assert stop.value.code == 2
        message = capsys.readouterr().err.strip()
        assert len(message.splitlines()) == 1 and flag in message, (name, message)


def test_argument_types_name_the_range() -> None:
    assert int_in_range(0, 27, "the images are 28 px")("27") == 27
    with pytest.raises(argparse.ArgumentTypeError, match="from 0 to 27 .the images are 28 px"):
        int_in_range(0, 27, "the images are 28 px")("28")
    assert seed_int("0") == 0 and seed_int(str(2**32 - 1)) == 2**32 - 1
    assert finite_float("-2.5") == -2.5
    for text in ("nan", "inf", "-inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            finite_float(text)


def test_the_core_knows_which_recipe_trains_each_arch() -> None:
    """The prefix table in xnornet.checkpoint agrees with each recipe's ARCHITECTURES."""
    for module, recipe in ((lenet, "MNIST/main.py"), (nin, "CIFAR_10/main.py"), (alexnet, "ImageNet/main.py")):
        assert {recipe_of_arch(arch) for arch in module.ARCHITECTURES} == {recipe}
    assert recipe_of_arch("resnet18") is None
    assert arch_mismatch("x", "LeNet_5_float", "LeNet_5").endswith("pass --arch LeNet_5_float")
    assert "run CIFAR_10/main.py" in arch_mismatch("x", "nin", "LeNet_5") and "--arch" not in arch_mismatch(
        "x", "nin", "LeNet_5")


def test_one_line_joins_lines_and_cuts_only_after_a_whole_sentence() -> None:
    from xnornet.cli import one_line

    assert one_line("first\n  second\tthird\n") == "first second third"
    text = "Reading failed: the central directory is missing. The file was cut short. More advice follows here."
    assert one_line(text, 80) == "Reading failed: the central directory is missing. The file was cut short."
    assert one_line("word " * 30, 22) == "word word word word ..."


def test_folder_checks_create_nothing_and_say_what_is_wrong(tmp_path) -> None:
    from xnornet.cli import UserError, check_output_file, check_writable_dir

    plain = tmp_path / "plain"
    plain.write_text("x")
    check_writable_dir(tmp_path / "a" / "b" / "c", "--output-dir")  # creatable: fine
    check_writable_dir(tmp_path, "--output-dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]  # nothing made, no probe left
    with pytest.raises(UserError, match="--output-dir .*plain is a file, not a folder"):
        check_writable_dir(plain, "--output-dir")
    with pytest.raises(UserError, match="plain is a file, so no folder can be made under it"):
        check_writable_dir(plain / "run", "--output-dir")
    with pytest.raises(UserError, match="-o .* is a directory: give a file name"):
        check_output_file(tmp_path, "-o")
    assert check_output_file(tmp_path / "new" / "m.xnor", "-o") == tmp_path / "new" / "m.xnor"
