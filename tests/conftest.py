"""Shared test settings: quiet, deterministic, and sized for a 2-core machine."""

import os

from hypothesis import settings as hypothesis_settings

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


# Generated cases are drawn from a fixed seed: the suite runs the same examples on every machine.
hypothesis_settings.register_profile("ringleader", derandomize=True)
hypothesis_settings.load_profile("ringleader")
