"""Every `sparsepeft train|mask` command written in the README and docs parses as written: its flags exist,
their values are accepted, and the combination is one the CLI allows (checked as a run checks it, before
any model is loaded). A renamed or removed flag fails here, not in a reader's terminal."""

import re
import shlex
from pathlib import Path

import pytest

from sparsepeft.cli.main import _parse
from sparsepeft.cli.train import _check_combination

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_COMMAND = re.compile(r"(?:^|\s)(?:\S*/)?(?:sparsepeft|-m sparsepeft)\s+(train|mask)\s")


def _shell_blocks(text: str) -> list[str]:
    """The fenced code blocks of a markdown page that hold shell commands (```bash, ```sh or a bare ```)."""
    blocks, current = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current = [] if line[3:].strip() in ("", "bash", "sh", "shell", "console") else False
            else:
                if current is not False:
                    blocks.append("\n".join(current))
                current = None
        elif isinstance(current, list):
            current.append(line)
    return blocks


def _commands() -> list[tuple[str, str, list[str]]]:
    """(where, command, argv) of every train/mask line in a fenced block, continuation lines joined."""
    found = []
    for page in PAGES:
        for block in _shell_blocks(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("  #")[0].split(" # ")[0].strip()
                match = _COMMAND.search(f" {line} ")
                if not match or "..." in line:
                    continue
                words = shlex.split(line)
                start = next(i for i, w in enumerate(words) if w in ("train", "mask") and i and "sparsepeft" in
                             words[i - 1])
                argv = words[start + 1:]
                if "--output-dir" not in argv and "--output_dir" not in argv:
                    argv += ["--output-dir", "unused"]
                found.append((f"{page.name}: {line[:80]}", words[start], argv))
    return found


COMMANDS = _commands()


def test_the_docs_hold_commands_to_check():
    assert len(COMMANDS) >= 15, "the extraction found too few commands: has the docs' format changed?"


@pytest.mark.parametrize("where,command,argv", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_a_documented_command_parses_as_written(where, command, argv):
    model_args, data_args, sparse_args, peft_args, layer_args, training_args = _parse(argv, command)
    _check_combination(sparse_args, peft_args, layer_args)
