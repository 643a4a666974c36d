"""Shared test settings: quiet, deterministic, and sized for a 2-core machine."""

import os
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


# Generated cases are drawn from a fixed seed: the suite runs the same examples on every machine.
hypothesis_settings.register_profile("ringleader", derandomize=True)
hypothesis_settings.load_profile("ringleader")


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    """One folder for the run directories of the tests that run recipes end to end, as a user's ``runs/``.

    The controller keeps the token store beside the run directories (``<runs>/tokens``): the
    first of these tests tokenises the demo corpus on its Ray cluster, the others find the
    store prepared, as a user's second run does, instead of starting Ray Data again.
    """
    return tmp_path_factory.mktemp("runs")


@pytest.fixture
def run_dir(runs_root: Path, tmp_path: Path) -> Path:
    """This test's run directory under ``runs_root`` (named after its ``tmp_path``, unique in the session)."""
    return runs_root / tmp_path.name
