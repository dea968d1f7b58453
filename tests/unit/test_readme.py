"""The README's CLI tour stays true: every `atomnet ...` line in it parses with the real
parser (verbs, flags and their values), and the two commands are the Makefile's."""
import re
import shlex
from pathlib import Path

import pytest

from ctl.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def tour_commands() -> list[str]:
    text = README.read_text()
    tour = text[text.index("## CLI tour"):]
    block = tour[tour.index("```") + 3:]
    block = block[: block.index("```")]
    out = []
    for line in block.splitlines():
        line = line.split("#")[0].strip()
        if not line.startswith("atomnet "):
            continue
        for part in re.split(r"\s*[|;]\s*", line):
            part = part.removeprefix("atomnet ").strip()
            if part and not part.startswith(">") and " > " not in part:
                out.append(part.replace("[--prune]", "--prune").replace("[-j]", "-j"))
            elif " > " in part:
                out.append(part.split(" > ")[0].removeprefix("atomnet ").strip())
    return out


@pytest.mark.parametrize("command", tour_commands())
def test_tour_command_parses(command):
    # Optional parts are given too; placeholders get a sample value.
    args = [{"N": "1", "S": "1"}.get(a, a) for a in shlex.split(command.replace("[", "").replace("]", ""))]
    build_parser().parse_args(args)   # exits (fails the test) on any unknown verb or flag


def test_the_two_commands_are_make_targets():
    text = README.read_text()
    makefile = (README.parent / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in text and re.search(rf"^{target}:", makefile, re.M)
