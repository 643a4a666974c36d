"""Bad topology input, as a user meets it through ``ringleader plan``: one line, exit 2, no file written."""

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.mangle import mangled

from launcher.cli import main
from topology.network.model import MEASURED_FORMAT
from topology.network.presets import load_topology


def _host_file(edit):
    """g6e-1x in the node/link form, changed by ``edit``."""
    data = load_topology("g6e-1x").to_dict()
    edit(data)
    return data


def _gpu(data, index=0):
    return next(n for n in data["nodes"] if n["kind"] == "gpu" and n["index"] == index)


def _part(data, kind, index=0):
    return next(n for n in data["nodes"] if n["kind"] == kind and n["index"] == index)


def _measured(**changes):
    data = {"format": MEASURED_FORMAT, "version": 1, "name": "lab",
            "hosts": [{"name": "a", "gpus": 8}, {"name": "b", "gpus": 8}],
            "host_bw_gbps": [[0, 10], [10, 0]]}
    data.update(changes)
    return data


def _with_leaf(data):
    data["nodes"][0]["leaf"] = "leaf9"


CASES = {
    "gpu-without-index": (_host_file(lambda d: _gpu(d).pop("index")), "index is None"),
    "gpu-string-index": (_host_file(lambda d: _gpu(d).update(index="0")), "index is '0'"),
    "gpu-host-is-a-switch": (_host_file(lambda d: (d["nodes"].append({"id": "sw", "kind": "leaf"}), _gpu(d).update(host="sw"))),
                             "its host 'sw' is a leaf"),
    "tflops-zero": (_host_file(lambda d: d["gpu"].update(tflops_bf16=0)), "tflops_bf16 is 0"),
    "tflops-negative": (_host_file(lambda d: d["gpu"].update(tflops_bf16=-362)), "tflops_bf16 is -362"),
    "tflops-string": (_host_file(lambda d: d["gpu"].update(tflops_bf16="362")), "tflops_bf16 is '362'"),
    "negative-gpu-count": (_measured(hosts=[{"name": "a", "gpus": -8}, {"name": "b", "gpus": 8}]), "gpus is -8"),
    "absurd-gpu-count": (_measured(hosts=[{"name": "a", "gpus": 10**30}, {"name": "b", "gpus": 8}]),
                         r"gpus is 10{30}; give the host's GPU count as an integer from 0 to 4096"),
    "gpu-index-beyond-a-host": (_host_file(lambda d: _gpu(d).update(index=10**12)), "CUDA ordinals of a host run from 0"),
    "leaf-naming-no-node": (_host_file(_with_leaf), "leaf 'leaf9' names no switch"),
    "self-loop": (_host_file(lambda d: d["links"].append({"a": "h00/gpu0", "b": "h00/gpu0", "bw_gbps": 25})), "to itself"),
    "duplicate-gpu-index": (_host_file(lambda d: _gpu(d, 1).update(index=0)), "both have index 0"),
    "socket-list-index": (_host_file(lambda d: _part(d, "socket").update(index=[1])), r"socket .*index is \[1\]"),
    "duplicate-socket-index": (_host_file(lambda d: _part(d, "socket", 1).update(index=0)), "sockets .* both have index 0"),
    "ec2-instance-type-not-a-string": ({"Instances": [{"InstanceId": "i-0", "InstanceType": ["g6e.48xlarge"], "NetworkNodes": ["a", "b"]}]},
                                       r"InstanceType is \['g6e.48xlarge'\]"),
    "ec2-instance-id-not-a-string": ({"Instances": [{"InstanceId": 7, "InstanceType": "g6e.48xlarge", "NetworkNodes": ["a", "b"]}]},
                                     "InstanceId is 7"),
    "measured-string-bandwidth": (_measured(host_bw_gbps=[[0, "fast"], [10, 0]]), r"host_bw_gbps\[0\]\[1\] is 'fast'"),
    "measured-string-tflops": (_measured(gpu={"tflops_bf16": "lots"}), "tflops_bf16 is 'lots'"),
    "link-unknown-field": (_host_file(lambda d: d["links"][0].update(latency=3)), r"unknown field\(s\) latency"),
    "duplicate-link": (_host_file(lambda d: d["links"].append({**d["links"][0], "a": d["links"][0]["b"], "b": d["links"][0]["a"]})),
                       "already linked"),
    "unknown-top-level-field": (_host_file(lambda d: d.update(link=[])), r"unknown field\(s\) link"),
    "labels-not-a-mapping": (_host_file(lambda d: d["nodes"][0].update(labels=["rack1"])), "labels is \\['rack1'\\]"),
    "measured-host-unknown-field": (_measured(hosts=[{"name": "a", "gpus": 8, "nic": 10}, {"name": "b", "gpus": 8}]),
                                    r"hosts\[0\]: unknown field\(s\) nic"),
    "measured-leaf-not-a-name": (_measured(hosts=[{"name": "a", "gpus": 8, "leaf": 5}, {"name": "b", "gpus": 8}]), "leaf is 5"),
    "measured-gpu-matrix-of-no-host": (_measured(gpu_bw_gbps={"c": [[0]]}), "gpu_bw_gbps names no host 'c'"),
    "measured-misspelt-field": (_measured(host_latency_us=[[0, 5], [5, 0]]), r"unknown field\(s\) host_latency_us"),
    "version-true": (_host_file(lambda d: d.update(version=True)), "version True is not supported"),
    "measured-version-null": (_measured(version=None), "version None is not supported"),
    "measured-version-2": (_measured(version=2), "version 2 is not supported"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_topology_is_one_line_exit_2(tmp_path, capsys, name):
    data, message = CASES[name]
    path = tmp_path / "topology.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "plan.json"
    assert main(["plan", "--topology", str(path), "--gpus", "8", "--ring", "8", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ringleader: error: "), err
    assert re.search(message, err), err
    assert not out.exists()


def test_output_naming_a_directory_is_refused_before_planning(tmp_path, capsys):
    assert main(["plan", "--topology", "g6e-1x", "--gpus", "8", "--ring", "8", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a directory" in err
    assert list(tmp_path.iterdir()) == []


def test_output_under_a_file_is_refused_before_planning(tmp_path, capsys):
    blocker = tmp_path / "plan.json"
    blocker.write_text("{}")
    assert main(["plan", "--topology", "g6e-1x", "--gpus", "8", "--ring", "8", "-o", str(blocker / "plan.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a folder" in err, err
    assert blocker.read_text() == "{}"


def test_topology_naming_a_directory_is_one_line(tmp_path, capsys):
    assert main(["plan", "--topology", str(tmp_path), "--gpus", "8", "--ring", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a directory" in err, err


# ------------------------------------------------------------------ any field, any wrong value
EC2 = {"Instances": [{"InstanceId": f"i-{k}", "InstanceType": "g6e.48xlarge", "AvailabilityZone": "us-east-1a",
                      "NetworkNodes": ["nn-a", f"nn-b{k // 2}", f"nn-c{k}"]} for k in range(4)]}
FORMS = {"node/link": load_topology("g6e-1x").to_dict(), "rails": load_topology("rails-16x-2nic").to_dict(),
         "measured": _measured(hosts=[{"name": "a", "gpus": 4, "leaf": "l0"}, {"name": "b", "gpus": 4, "leaf": "l1"}]),
         "ec2": EC2}
"""The four ways a topology reaches the planner, small enough to plan in milliseconds."""


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=mangled(FORMS), gpus=st.sampled_from([4, 8, 16]), ring=st.sampled_from([2, 4, 8]))
def test_any_mangled_topology_plans_or_is_refused_in_one_line(tmp_path_factory, capsys, case, gpus, ring):
    """Whatever field of a topology file is dropped, repeated or given a wrong value, ``ringleader plan`` either
    plans (the file still describes a cluster) or refuses in one line with exit 2: never a traceback."""
    form, data, changes = case
    path = tmp_path_factory.mktemp("mangled") / "topology.json"
    path.write_text(json.dumps(data))
    capsys.readouterr()
    code = main(["plan", "--topology", str(path), "--gpus", str(gpus), "--ring", str(ring), "--seq-len", "65536"])
    err = capsys.readouterr().err
    assert code in (0, 2), (form, changes, err)
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("ringleader: error: "), (form, changes, err)
