"""``ringleader plan``: the summary, the comparison table, the plan file, and one-line errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import main
from topology.planning.plan import Plan
from topology.network.presets import load_topology

REPO = Path(__file__).resolve().parent.parent


def test_summary_and_plan_file(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--topology", "g6e-4x", "--gpus", "32", "--ring", "16", "--ulysses", "2", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dp 2 x ring 8 x ulysses 2" in text and "slowest hop:" in text and "MFU" in text
    plan = Plan.load(out)
    assert plan.world_size == 32 and plan.strategy == "aware"
    ring0 = [plan.placements[r] for r in plan.groups.ring_groups[0]]
    first_run = f"{ring0[0].host}:{','.join(str(p.gpu) for p in ring0 if p.host == ring0[0].host)}"
    assert first_run in text  # rings are printed as host:gpu runs
    assert json.loads(out.read_text())["cost"]["slowest_hop_gbps"] == plan.cost["slowest_hop_gbps"]


def test_compare_prints_every_strategy_and_the_bound(capsys):
    assert main(["plan", "--topology", "leafspine-64x-2to1", "--gpus", "512", "--ring", "64",
                 "--seq-len", str(64 * 8192), "--compare"]) == 0
    table = capsys.readouterr().out.split("\n\n")[-1].splitlines()
    assert table[0].split()[:3] == ["strategy", "ring", "step"]
    rows = {line.split()[0]: line for line in table[1:] if " traded: " not in line}
    assert list(rows) == ["aware", "naive", "random", "bound"]
    ratio = {name: float(line.split()[-1]) for name, line in rows.items()}
    assert ratio["aware"] <= 1.05 and ratio["naive"] >= 1.5  # the must-show figures, as printed
    step = {name: float(line.split(" s ")[0].split()[-1]) for name, line in rows.items()}
    for name in ("aware", "naive", "random"):  # "x bound" is the step time over the step-time bound
        assert ratio[name] == pytest.approx(step[name] / step["bound"], abs=0.011)
    assert table[-1].startswith("aware traded: ")


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _topology_with_link(link):
    data = load_topology("g6e-1x").to_dict()
    data["links"][0] = link
    return json.dumps(data)


BAD = [
    (lambda d: ["--topology", _write(d, "t.yaml", "nodes: [\n  {id: a\n")], "not valid YAML"),
    (lambda d: ["--topology", _write(d, "t.json", _topology_with_link({"a": "h00/gpu0", "b": "h09/gpu0", "bw_gbps": 25}))],
     "unknown endpoint 'h09/gpu0'"),
    (lambda d: ["--topology", _write(d, "t.json", _topology_with_link({"a": "h00/gpu0", "b": "h00/pcie0", "bw_gbps": -25}))],
     "bw_gbps is -25"),
    (lambda d: ["--topology", _write(d, "t.json", _topology_with_link({"a": "h00/gpu0", "b": "h00/pcie0"}))],
     "bw_gbps is missing"),
    (lambda d: ["--topology", "g6e-4x", "--ring", "12"], "ring size \\(cp\\) 12 does not divide gpus 32"),
    (lambda d: ["--topology", "g6e-4x", "--gpus", "40", "--ring", "8"], "gpus 40 is more than the 32 GPUs"),
    (lambda d: ["--topology", "g6e-4x", "--seq-len", "1000"], "seq_len 1000 is not divisible by 2 x ring size"),
]


@pytest.mark.parametrize("args,match", BAD, ids=[m.split()[0] + "-" + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_input_is_one_line_exit_2_and_no_file(tmp_path, capsys, args, match):
    out = tmp_path / "plan.json"
    argv = ["plan", "--gpus", "32", "--ring", "8", *args(tmp_path), "-o", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ringleader: error: ")
    assert re.search(match, err)
    assert not out.exists()


def test_real_command_exit_codes(tmp_path):
    """The installed entry point, as a user runs it: no traceback on bad input."""
    ok = subprocess.run([sys.executable, "-m", "launcher", "plan", "--topology", "l40s-host", "--gpus", "8", "--ring", "4"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "h00:0,1,2,3" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "launcher", "plan", "--topology", "l40s-host", "--gpus", "8", "--ring", "3",
                          "-o", str(tmp_path / "p.json")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.splitlines()) == 1
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("argv, match", [
    (["plan", "--topology", "g6e-1x", "--gpus", "eight", "--ring", "4"], "argument --gpus: invalid int value: 'eight'"),
    (["plan", "--topology", "g6e-1x", "--gpus", "8"], "required: --ring"),
    (["plann"], "invalid choice: 'plann'"),
])
def test_malformed_flags_are_one_line_with_where_to_look(capsys, argv, match):
    """argparse's own errors (a word for a number, a flag left out, a misspelt command) are one line and exit 2 like
    every other bad input, and say where the usage is."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and match in err and "--help`" in err
