"""The profiler on a real multi-node Ray (one machine, nodes at 127.0.0.2..):
round-robin rounds, the measured format, labels as switch hints, the cache,
and ``ringleader profile`` end to end."""

import itertools
import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.ray_utils import REPO, local_cluster
from topology.network.model import MEASURED_FORMAT, Topology
from topology.profiling.profile import cache_key, round_robin


@given(st.integers(min_value=0, max_value=40))
def test_round_robin_meets_every_pair_once(n):
    rounds = round_robin(n)
    assert len(rounds) == (0 if n < 2 else n - 1 if n % 2 == 0 else n)
    pairs = [p for r in rounds for p in r]
    assert sorted(pairs) == list(itertools.combinations(range(n), 2))
    for r in rounds:
        busy = [h for p in r for h in p]
        assert len(busy) == len(set(busy)), f"a host is in two pairs of one round: {r}"
        assert len(r) == n // 2


LABELS = [{"ringleader.io/leaf": "rack-a"}, {"ringleader.io/leaf": "rack-b"}, {"ringleader.io/leaf": "rack-a"}, {"ringleader.io/leaf": "rack-b"}]


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    """One profile cache for the module: the CLI test re-profiles what the first test cached."""
    return tmp_path_factory.mktemp("profiles")


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(hosts=4, gpus_per_host=2, cpus_per_host=1, labels=LABELS) as lc:
        yield lc


@pytest.mark.ray
def test_profile_four_hosts(cluster, profiles):
    from topology.profiling.profile import profile_cluster

    data = profile_cluster(transfer_mb=1, repeats=3, cache_dir=profiles, timeout_s=60, latency_iters=5)
    n = 4
    assert data["format"] == MEASURED_FORMAT
    hosts = data["hosts"]
    assert [h["ip"] for h in hosts] == cluster.ips
    assert [h["name"] for h in hosts] == cluster.ips
    assert [h["node_id"] for h in hosts] == [cluster.node_id(i) for i in range(n)]
    assert [h["gpus"] for h in hosts] == [2] * n
    assert [h["leaf"] for h in hosts] == ["rack-a", "rack-b", "rack-a", "rack-b"]
    meta = data["meta"]
    assert meta["leaf_source"] == "labels" and meta["backend"] == "gloo"

    # n - 1 rounds, every pair exactly once, no host twice in a round.
    rounds = [[tuple(p) for p in r] for r in meta["rounds"]]
    assert len(rounds) == n - 1 == len(meta["round_s"])
    assert sorted(p for r in rounds for p in r) == list(itertools.combinations(range(n), 2))
    for r in rounds:
        busy = [h for p in r for h in p]
        assert len(busy) == len(set(busy))
    # Each pair was measured in both directions, in its own round.
    flows = {(f["src"], f["dst"]): f for f in meta["flows"]}
    assert set(flows) == {(a, b) for a in range(n) for b in range(n) if a != b}
    for (a, b), f in flows.items():
        assert tuple(sorted((a, b))) in rounds[f["round"]]
        assert len(f["seconds"]) == 3
        assert data["host_bw_gbps"][a][b] == pytest.approx(2**20 / sorted(f["seconds"])[1] / 1e9)
        assert data["host_bw_gbps"][a][b] > 0.01 and data["host_lat_us"][a][b] > 0

    # Each host's NIC was measured with two peers sending at once; the model shares it among flows.
    assert all(h["nic_gbps"] > 0.01 for h in hosts)
    topo = Topology.from_measured(data)
    assert topo.hosts == cluster.ips and topo.num_gpus == 8
    assert topo.link(f"{hosts[0]['name']}/pcie0", f"{hosts[0]['name']}/nic0")["bw_gbps"] == hosts[0]["nic_gbps"]
    assert [topo.leaf_of(h) for h in topo.hosts] == ["rack-a", "rack-b", "rack-a", "rack-b"]
    # Across racks a pair goes through the racks' uplinks, sized by what the profile's concurrent flows carried:
    # alone, a pair gets at least the share it measured.
    assert topo.host_bandwidth(cluster.ips[0], cluster.ips[3]) >= min(data["host_bw_gbps"][0][3], data["host_bw_gbps"][3][0]) * (1 - 1e-9)

    # The cache is keyed by the node ids: the same cluster is not measured again ...
    cached = profiles / f"profile-{cache_key([h['node_id'] for h in hosts])}.json"
    assert json.loads(cached.read_text()) == data
    assert profile_cluster(transfer_mb=1, repeats=3, cache_dir=profiles, timeout_s=60) == data


@pytest.mark.ray
def test_cli_reprofiles_and_draws(cluster, profiles, tmp_path):
    # ... unless asked to (runs after the test above, which filled the cache).
    cached = next(profiles.glob("profile-*.json"))
    before = json.loads(cached.read_text())
    out, png = tmp_path / "topo.json", tmp_path / "bw.png"
    cmd = [sys.executable, "-m", "launcher", "profile", "--address", cluster.address, "-o", str(out), "--reprofile",
           "--profile-mb", "0.5", "--profile-repeats", "2", "--profile-cache", str(profiles), "--heatmap", str(png)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = json.loads(out.read_text())
    assert fresh["meta"]["repeats"] == 2 and fresh["meta"]["flows"] != before["meta"]["flows"]
    assert json.loads(cached.read_text()) == fresh
    assert Topology.from_measured(fresh).hosts == cluster.ips
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rack-a" in done.stdout and "3 rounds" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--address", "127.0.0.1:9"], "cannot reach a Ray cluster at 127.0.0.1:9"),
    (["--profile-mb", "0"], "--profile-mb is 0.0; give a positive size in MiB"),
    (["--repeats", "0"], "--profile-repeats is 0; give at least 1"),  # the earlier name, still accepted
    (["--heatmap", "bw.txt"], "--heatmap bw.txt: give a .png"),
])
def test_cli_profile_bad_input(tmp_path, capsys, args, message):
    from launcher.cli import main

    out = tmp_path / "t.json"
    assert main(["profile", *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ringleader: error: {message}") and len(err.strip().splitlines()) == 1
    assert not out.exists()
