"""Every subcommand's --help prints its flags and exits 0 (argparse formats help strings with %)."""

import pytest

from sparsepeft.cli.main import main

FLAGS = {"train": ["--method", "--keep-ratio", "--budget", "--learning-rate", "--layers", "--split-seed"],
         "mask": ["--method", "--keep-ratio", "--selection"],
         "merge": ["--model", "--delta", "--output-dir"],
         "demo": ["--output-dir"]}


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_help_prints_every_flag(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for flag in FLAGS[command]:
        assert flag.replace("-", "_")[2:] in out.replace("-", "_"), f"{command} --help does not list {flag}"


def test_help_states_the_default_learning_rates(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "full 5e-05, fish/random 0.002, PEFT methods 0.001" in out
