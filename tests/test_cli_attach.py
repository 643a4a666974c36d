"""The command line's common ground: ``--version``, one flag name per setting, one rule for which Ray to use."""

from __future__ import annotations

import json
import tomllib

import pytest
import ray

from launcher.cli import build_parser, main
from tests.ray_utils import REPO


def test_version_is_the_projects(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"ringleader {version}"


def test_run_and_profile_spell_each_shared_setting_alike():
    def flags(command: str) -> set[str]:
        sub = build_parser(command)._subparsers._group_actions[0].choices[command]
        return {s for a in sub._actions if a.help != "==SUPPRESS==" for s in a.option_strings}

    shared = {"--address", "--verbose", "--profile-mb", "--profile-repeats", "--profile-timeout", "--profile-cache", "--reprofile"}
    assert shared <= flags("run") and shared <= flags("profile")
    # The earlier names of `profile` still parse, to the same settings.
    old = build_parser("profile").parse_args(["profile", "--transfer-mb", "2", "--repeats", "3", "--cache-dir", "c", "--timeout", "9"])
    new = build_parser("profile").parse_args(["profile", "--profile-mb", "2", "--profile-repeats", "3", "--profile-cache", "c",
                                              "--profile-timeout", "9"])
    assert vars(old) == vars(new)


@pytest.mark.ray
def test_profile_without_an_address_measures_an_embedded_ray(tmp_path, capsys, monkeypatch):
    """No --address, no RAY_ADDRESS: a Ray of its own (one node, this machine), never one found running here."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "topology.json"
    assert main(["profile", "-o", str(out), "--profile-cache", str(tmp_path / "cache"), "--profile-mb", "0.1"]) == 0
    assert not ray.is_initialized()
    printed = capsys.readouterr().out
    assert "started an embedded Ray on this machine" in printed and f"wrote {out} (1 hosts" in printed
    assert len(json.loads(out.read_text())["hosts"]) == 1
