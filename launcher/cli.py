"""The ``ringleader`` command line.

    ringleader plan --topology g6e-64x --gpus 512 --ring 64 --compare
    ringleader run clusters/recipes/demo.yaml            # embedded local Ray
    ray job submit --working-dir . -- python -m launcher run clusters/recipes/demo.yaml

Each subcommand lives in its own module with ``add_arguments(parser)`` and
``run(args) -> int``. Bad input raises ``ConfigError``: one line on stderr per problem,
exit status 2, nothing started and no file written.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from topology.errors import ConfigError

COMMANDS = {
    "plan": ("launcher.commands.plan", "place ranks on a topology and print the plan"),
    "profile": ("launcher.commands.profile", "measure the bandwidth between the hosts of a Ray cluster"),
    "run": ("launcher.commands.run", "run a recipe's stages on Ray (or --dry-run to size them)"),
    "calibrate": ("launcher.commands.calibrate", "measure the cost model's achieved rates (or fit them from a run)"),
    "clusters": ("launcher.commands.clusters", "render cluster-launcher and KubeRay configs for a recipe"),
    "viz": ("launcher.commands.viz", "draw a topology and a plan's rings (HTML, PNG or SVG)"),
    "niah": ("launcher.commands.niah", "needle-in-a-haystack evaluation of a model"),
    "data": ("launcher.commands.data", "tokenise corpora once into the shared token store (data prepare)"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, its errors in one line like every other ringleader error (the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported, so each command starts fast."""
    parser = _Parser(prog="ringleader", description="Topology-aware launcher for long-context training on Ray.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(cmd)
            cmd.set_defaults(_run=module.run)
    return parser


def version() -> str:
    """The installed distribution's version (pyproject.toml's), or that of the source tree when run from it."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("ringleader")
    except PackageNotFoundError:
        import tomllib
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except ConfigError as exc:
        for line in str(exc).splitlines():  # several problems at once: one line each
            print(f"ringleader: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ringleader: interrupted", file=sys.stderr)
        return 130
