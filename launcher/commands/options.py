"""Flags that mean the same in every command, defined once so they are spelt the same.

``ringleader run`` and ``ringleader profile`` both join (or start) a Ray
cluster and both measure its network; each setting has one flag name.
"""

from __future__ import annotations

import argparse
import logging
import sys

from launcher.runtime.attach import ADDRESS_HELP
from topology.errors import ConfigError

HIDDEN = argparse.SUPPRESS


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """``--address`` and ``--verbose``: which Ray, and whether third-party output reaches the console."""
    parser.add_argument("--address", help=ADDRESS_HELP)
    parser.add_argument("--verbose", action="store_true",
                        help="show the workers' own output (DeepSpeed, torch warnings, Ray) on the console, "
                             "besides the rank logs")


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """How the network is measured: message size, repeats, timeout, cache."""
    parser.add_argument("--profile-mb", type=float, default=64.0, metavar="MIB",
                        help="size of each timed message between two hosts (default: %(default)s; smaller on slow links)")
    parser.add_argument("--profile-repeats", type=int, default=5, metavar="N",
                        help="timed messages per host pair and direction; the median counts (default: %(default)s)")
    parser.add_argument("--profile-timeout", type=float, default=300.0, metavar="S",
                        help="longest wait for one measurement round (default: %(default)s)")
    parser.add_argument("--profile-cache", metavar="DIR",
                        help="where measured profiles are kept, keyed by node ids (default: ~/.cache/ringleader/profiles)")
    parser.add_argument("--reprofile", action="store_true", help="measure even if a profile of these nodes is cached")
    # Earlier names of `ringleader profile`, still accepted.
    parser.add_argument("--transfer-mb", dest="profile_mb", type=float, default=HIDDEN, help=HIDDEN)
    parser.add_argument("--repeats", dest="profile_repeats", type=int, default=HIDDEN, help=HIDDEN)
    parser.add_argument("--timeout", dest="profile_timeout", type=float, default=HIDDEN, help=HIDDEN)
    parser.add_argument("--cache-dir", dest="profile_cache", default=HIDDEN, help=HIDDEN)


def check_profile_arguments(args: argparse.Namespace) -> None:
    """Raise ConfigError naming the first profiling flag out of range."""
    if not args.profile_mb > 0:
        raise ConfigError(f"--profile-mb is {args.profile_mb}; give a positive size in MiB")
    if args.profile_repeats < 1:
        raise ConfigError(f"--profile-repeats is {args.profile_repeats}; give at least 1")
    if not args.profile_timeout > 0:
        raise ConfigError(f"--profile-timeout is {args.profile_timeout}; give a positive number of seconds")


class _Stdout(logging.StreamHandler):
    """A handler on whatever ``sys.stdout`` is when a line is written (a test's capture, a redirect)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging() -> logging.Logger:
    """The launcher's own lines on stdout, timestamped: ``12:00:01 ringleader: ...``; returns its logger."""
    log = logging.getLogger("ringleader")
    if not any(isinstance(h, _Stdout) for h in log.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(asctime)s ringleader: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log
