"""The dry run's data readiness: tokens per pass against tokens trained, long documents, repeats flagged."""

import re

import numpy as np
import yaml

from launcher.cli import main
from stage_helpers import CORPUS, MODEL
from trainer.data import read_documents
from trainer.data.packing import upsample_factor
from trainer.data.prepare import STORE_DIR, PrepareSpec, locate
from trainer.data.store import commit, new_build_dir, write_shard
from trainer.data.tokenize import tokenize_documents


def _row(text: str, label: str) -> list[str]:
    line = next(l for l in text.splitlines() if l.startswith(label))
    return re.split(r"\s{2,}", line[len(label):].strip())


def _write_store(spec: PrepareSpec, root) -> None:
    """The store ``ringleader data prepare`` would write, built in this process with the same writer."""
    path, _, tok = locate(spec, root)
    docs = tokenize_documents(tok, read_documents(spec.path, spec.kind), spec.kind)
    tmp = new_build_dir(path)
    name, starts = write_shard(tmp, docs)
    commit(tmp, path, [name], np.array([(0, s, len(d)) for s, (d, _) in zip(starts, docs)]), {"kind": spec.kind})


def test_dry_run_reports_prepared_tokens_long_documents_and_repeats(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "d", "model": MODEL, "data": {"path": str(CORPUS)}, "run_dir": str(tmp_path / "runs"),
        "stages": [{"name": "256", "seq_len": 256, "rope_theta": 20000.0, "batch": 1, "gpus": 2, "steps": 6},
                   {"name": "16k", "seq_len": 16384, "rope_theta": 40000.0, "batch": 1, "gpus": 4, "steps": 30}]}))
    assert main(["run", str(recipe), "--dry-run", "--topology", "g6e-1x"]) == 0
    out = capsys.readouterr().out
    assert _row(out, "data tokens per pass") == ["not prepared", "not prepared"]
    assert "is not prepared (stage 256, 16k): the stage tokenises it on the cluster" in out

    _write_store(PrepareSpec(str(CORPUS)), tmp_path / "runs" / STORE_DIR)
    assert main(["run", str(recipe), "--dry-run", "--topology", "g6e-1x"]) == 0
    out = capsys.readouterr().out
    sizes = [len(d.encode()) + 2 for d in read_documents(CORPUS)]  # byte tokens + BOS + EOS
    per_pass = sum(n * upsample_factor(n, 4096) for n in sizes)
    assert _row(out, "data tokens per pass") == [f"{per_pass:,}"] * 2
    assert _row(out, "  passes trained") == [f"{256 * 6 / per_pass:.2f}", f"{16384 * 30 / per_pass:.2f}"]
    long_16k = [n for n in sizes if n > 16384 // 4]
    assert _row(out, "  docs > seq_len/4") == [str(len(sizes)), str(len(long_16k))]
    share = sum(n * upsample_factor(n, 4096) for n in long_16k) / per_pass
    assert _row(out, "  sample share of them") == ["100%", f"{share:.0%}"]
    assert f"stage 16k: trains on {16384 * 30:,} tokens from {per_pass:,} prepared" in out
    assert "stage 256: trains on" not in out and "is not prepared" not in out
