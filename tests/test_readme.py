"""The README's sample sessions, run: every cluster-free ``$ ringleader ...`` command works and prints what is shown.

Each fenced block whose lines start with ``$ ringleader`` is a session: a
command, then the output the README shows for it (``...`` marks lines left
out). The commands that need no cluster (plan, viz, clusters, ``run
--dry-run``) run here through the real command line, with their ``-o``
files moved to a temporary directory. The output must have the shown shape:
the README's lines, by their leading words, appear in the same order. The
numbers are free to change; a renamed field, a lost line or a reordered
report is drift.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from launcher.cli import main
from tests.ray_utils import REPO

README = REPO / "README.md"
CLUSTER_FREE = ("plan", "viz", "clusters")
"""Subcommands that never start Ray; ``run`` joins them with ``--dry-run``."""


def sessions(text: str) -> list[tuple[str, list[str]]]:
    """(command line, shown output lines) of every ``$ ringleader`` line in a fenced block, in order."""
    out: list[tuple[str, list[str]]] = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.splitlines():
            if line.startswith("$ "):
                out.append((line[2:], []))
            elif out and block.lstrip().startswith("$ ") and line.strip():
                out[-1][1].append(line)
    return [(cmd, shown) for cmd, shown in out if cmd.startswith("ringleader ")]


def cluster_free(command: str) -> bool:
    argv = shlex.split(command)[1:]
    return bool(argv) and (argv[0] in CLUSTER_FREE or (argv[0] == "run" and "--dry-run" in argv))


def shape(line: str) -> str:
    """A line's leading words, up to the first that holds a number or a path: what must not drift."""
    words = []
    for word in line.split():
        if re.search(r"\d|/|\.\w", word) or word == "...":
            break
        words.append(word)
    return " ".join(words)


def writes(command: str) -> set[str]:
    """Files the command writes (its ``-o``)."""
    argv = shlex.split(command)
    return {argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-o", "--output")}


def argv_of(command: str, tmp: Path) -> list[str]:
    """The command's arguments, every file a README session writes moved into ``tmp`` (``[...]``: included)."""
    moved = {name: str(tmp / Path(name).name) for c, _ in SESSIONS for name in writes(c)}
    return [moved.get(a, a) for a in shlex.split(command.replace("[", "").replace("]", ""))[1:]]


SESSIONS = sessions(README.read_text())


def test_readme_sessions_are_found():
    commands = [shlex.split(c)[1] for c, _ in SESSIONS if cluster_free(c)]
    assert {"plan", "viz", "run"} <= set(commands), commands
    assert sum(len(shown) for c, shown in SESSIONS if cluster_free(c)) > 20


def test_shape_ignores_numbers_and_paths():
    assert shape("slowest hop: 12.50 GB/s (rank 7 -> 8)") == "slowest hop:"
    assert shape("  total (usable)                 28.9 (43.2)") == "total (usable)"
    assert shape("wrote rings.html (leafspine-64x-2to1: 64 hosts)") == "wrote"
    assert shape("    0: h29:1,2,3 -> h28:1,2,3") == ""


@pytest.mark.parametrize("command, shown", [s for s in SESSIONS if cluster_free(s[0])],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_readme_command_prints_the_shape_shown(command, shown, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the README's paths are relative to the repository
    # A session that reads a file an earlier one writes (viz --plan plan.json) runs that one first.
    reads = set(shlex.split(command)) - writes(command)
    for earlier, _ in SESSIONS[:SESSIONS.index((command, shown))]:
        if cluster_free(earlier) and writes(earlier) & reads:
            assert main(argv_of(earlier, tmp_path)) == 0
    capsys.readouterr()
    code = main(argv_of(command, tmp_path))
    printed = capsys.readouterr()
    assert code == 0, printed.err
    actual = [shape(line) for line in printed.out.splitlines()]
    expected = [s for s in (shape(line) for line in shown) if s]
    position = 0
    for want in expected:
        assert want in actual[position:], (f"README shows a line starting {want!r} where the real output has none "
                                           f"(after line {position}):\n{printed.out}")
        position = actual.index(want, position) + 1
