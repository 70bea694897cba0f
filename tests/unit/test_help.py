"""pretrain_gpt.py --help: a line for every flag, with its default; quick, because neither --help
nor a flag error imports megatron-core, DeepSpeed, transformers or wandb (seconds each)."""

import argparse
import subprocess
import sys

import pytest

from megatron_patch.training.arguments import build_parser
from tests.train_helpers import ROOT, subprocess_env

HEAVY = ("megatron.core", "deepspeed", "transformers", "wandb")


def test_every_flag_has_a_help_line_and_shows_its_default():
    parser = build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{action.option_strings[0]} has no help line"
        shown = formatter._get_help_string(action)
        if action.nargs != 0 and action.default not in (None, "", argparse.SUPPRESS):
            assert "default" in shown.lower(), f"{action.option_strings[0]}: help does not show its default"


def test_every_group_says_whose_flags_it_holds():
    parser = build_parser()
    for group in parser._action_groups[2:]:  # after argparse's own positional/options groups
        assert group.description, f"group '{group.title}' has no description"


@pytest.mark.parametrize("argv", [["--help"], ["--num-layers", "2", "--hidden-size", "8", "--num-attention-heads", "3",
                                                "--seq-length", "8", "--micro-batch-size", "1", "--train-iters", "9",
                                                "--lr", "1e-3", "--mock-data"]])
def test_help_and_flag_errors_import_nothing_heavy(argv):
    r = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "pretrain_gpt.py"), *argv],
                       capture_output=True, text=True, timeout=120, env=subprocess_env(), cwd=ROOT)
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    heavy = sorted(m for m in imported if m == "megatron.core" or m.split(".")[0] in HEAVY)
    assert not heavy, f"{' '.join(argv[:1])} imported {heavy[:5]}"
    assert ("usage:" in r.stdout) if argv == ["--help"] else ("is not divisible" in r.stderr)
