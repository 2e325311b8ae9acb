"""The `simmim` command's start: `--help` and `models` without torch, and the subcommands mounted by
name agreeing with their modules."""

import subprocess
import sys

import pytest

from simmim.cli import HEAVY_COMMANDS, build_parser

NO_TORCH = """
import sys
from simmim.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
assert "torch" not in sys.modules, "torch was imported"
"""


def _subcommands(parser):
    action = next(a for a in parser._actions if a.dest == "command")
    return {c.dest: c.help for c in action._choices_actions}


@pytest.mark.slow
def test_help_and_cached_models_start_without_torch(tmp_path):
    env = {"SIMMIM_CACHE": str(tmp_path), "PYTHONPATH": ":".join(sys.path)}
    for argv in (["--help"], ["models", "--json", "swin-nano"]):
        if argv[0] == "models":  # fill the cache first (measuring needs torch)
            subprocess.run([sys.executable, "-m", "simmim.cli", *argv], env=env, check=True, capture_output=True)
        done = subprocess.run([sys.executable, "-c", NO_TORCH.format(argv=argv)], env=env, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr


def test_subcommands_mounted_by_name_have_their_modules_help():
    full, light = _subcommands(build_parser()), _subcommands(build_parser(""))
    assert full == light
    assert {name: summary for name, (_, summary) in HEAVY_COMMANDS.items()} == {n: full[n] for n in HEAVY_COMMANDS}


@pytest.mark.parametrize("command", ["predict", "reconstruct", "serve"])
def test_weights_and_random_weights_exclude_each_other(command, capsys):
    argv = [command, "swin-nano", *(["x.png"] if command != "serve" else []), "--weights", "w.pth", "--random-weights"]
    with pytest.raises(SystemExit) as exit_:
        build_parser(command).parse_args(argv)
    assert exit_.value.code == 2
    assert "not allowed with argument --weights" in capsys.readouterr().err
