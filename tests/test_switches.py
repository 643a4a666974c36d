"""Leaf inference from measured matrices: hand-made ones with noise, and what
the profiler would measure on the leaf-spine presets (rounds run at once, so
flows crossing an oversubscribed uplink together share it)."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topology.cost import FlowModel
from topology.errors import ConfigError
from topology.network.model import MEASURED_FORMAT, Topology
from topology.network.presets import PRESETS
from topology.planning.planner import make_plan
from topology.profiling.profile import round_robin
from topology.network.switches import leaf_groups, leaf_names


def partition(groups):
    """Groups as a set of frozensets of host indices, so numbering does not matter."""
    out = {}
    for i, g in enumerate(groups):
        out.setdefault(g, set()).add(i)
    return {frozenset(v) for v in out.values()}


def noisy_matrix(leaves, host_bw, cross_bw, noise, seed):
    rng = random.Random(seed)
    n = len(leaves)
    return [[0.0 if i == j else
             (min(host_bw[i], host_bw[j]) if leaves[i] == leaves[j] else min(host_bw[i], host_bw[j], cross_bw))
             * rng.uniform(1 - noise, 1 + noise) for j in range(n)] for i in range(n)]


def test_hand_made_two_leaves():
    bw = [[0, 50, 20, 20], [50, 0, 20, 20], [20, 20, 0, 49], [20, 20, 49, 0]]
    assert leaf_groups(bw) == [0, 0, 1, 1]


def test_interleaved_leaves_with_a_degraded_host_and_noise():
    # Address order alternates leaves; host 4 has a 300 link, uplinks 200: still found.
    leaves = [i % 2 for i in range(6)]
    host = [400, 400, 400, 400, 300, 400]
    bw = noisy_matrix(leaves, host, 200, 0.05, seed=1)
    assert partition(leaf_groups(bw)) == partition(leaves)


def test_contended_cross_pairs_do_not_merge_leaves():
    # Some cross-leaf pairs were measured alone (full uplink), others sharing it three ways.
    leaves = [0, 0, 0, 1, 1, 1]
    bw = [[0.0 if i == j else 48 if leaves[i] == leaves[j] else (24 if (i + j) % 3 else 8) for j in range(6)] for i in range(6)]
    assert partition(leaf_groups(bw)) == partition(leaves)


def test_no_gap_is_one_leaf():
    bw = noisy_matrix([0] * 5, [50] * 5, 50, 0.05, seed=2)
    assert leaf_groups(bw) == [0] * 5
    assert leaf_groups([[0, 1], [1, 0]]) == [0, 0]
    assert leaf_groups([[0]]) == [0]


def test_latency_splits_when_bandwidth_cannot():
    bw = [[0 if i == j else 12.5 for j in range(4)] for i in range(4)]
    lat = [[0, 4, 8, 8], [4, 0, 8, 8], [8, 8, 0, 4], [8, 8, 4, 0]]
    assert leaf_groups(bw) == [0, 0, 0, 0]
    assert leaf_groups(bw, lat) == [0, 0, 1, 1]


def test_bad_matrices_raise():
    with pytest.raises(ConfigError, match="n x n"):
        leaf_groups([[0, 1, 2], [1, 0, 2]])
    with pytest.raises(ConfigError, match="negative"):
        leaf_groups([[0, -1, 1], [1, 0, 1], [1, 1, 0]])
    with pytest.raises(ConfigError, match="latency matrix"):
        leaf_groups([[0, 1, 1], [1, 0, 1], [1, 1, 0]], [[0, 1], [1, 0]])


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(2, 6), min_size=2, max_size=5),
    oversub=st.floats(2.0, 8.0),
    noise=st.floats(0.0, 0.06),
    seed=st.integers(0, 10**6),
)
def test_random_fabrics_recover_leaves(sizes, oversub, noise, seed):
    rng = random.Random(seed)
    leaves = [k for k, size in enumerate(sizes) for _ in range(size)]
    rng.shuffle(leaves)
    host = [rng.choice([25.0, 50.0]) for _ in leaves]
    bw = noisy_matrix(leaves, host, 25.0 / oversub, noise, seed)
    assert partition(leaf_groups(bw)) == partition(leaves)


def simulated_profile(topo):
    """What the profiler measures on ``topo``: its rounds and phases, each phase's flows at once, links shared."""
    hosts = topo.hosts
    nics = [topo.host_endpoint(h) for h in hosts]
    flows = FlowModel(topo)
    n = len(hosts)
    bw = [[0.0] * n for _ in range(n)]
    for pairs in round_robin(n):
        for phase in (0, 1):
            sends = [(a, b) if phase == 0 else (b, a) for a, b in pairs]
            for (s, d), (rate, _) in zip(sends, flows.bandwidths([(nics[s], nics[d]) for s, d in sends])):
                bw[s][d] = rate
    lat = [[0.0 if a == b else topo.latency(nics[a], nics[b]) for b in range(n)] for a in range(n)]
    return bw, lat


@pytest.mark.parametrize("name", ["leafspine-64x-1to1", "leafspine-64x-2to1", "leafspine-64x-4to1", "leafspine-64x-2to1-degraded"])
def test_presets_leaves_recovered(name):
    topo = PRESETS[name]()
    bw, lat = simulated_profile(topo)
    truth = [topo.leaf_of(h) for h in topo.hosts]
    assert partition(leaf_groups(bw, lat)) == partition(truth)


def test_leaf_names_prefer_labels():
    bw = [[0, 50, 20, 20], [50, 0, 20, 20], [20, 20, 0, 50], [20, 20, 50, 0]]
    labelled = [{"ringleader.io/leaf": x} for x in ("r1", "r1", "r2", "r2")]
    assert leaf_names(bw, labelled) == (["r1", "r1", "r2", "r2"], "labels")
    # Labels override the measurement when every host has one ...
    crossed = [{"topology.k8s.aws/network-node-layer-3": x} for x in ("nn-a", "nn-b", "nn-a", "nn-b")]
    assert leaf_names(bw, crossed) == (["nn-a", "nn-b", "nn-a", "nn-b"], "labels")
    # ... and name the inferred groups when only some do.
    partial = [{"ringleader.io/rack": "r7"}, {}, {}, None]
    assert leaf_names(bw, partial) == (["r7", "r7", "leaf1", "leaf1"], "inferred")
    assert leaf_names(bw, [{}] * 4) == (["leaf0", "leaf0", "leaf1", "leaf1"], "inferred")


def test_a_profile_naming_no_switch_gets_leaves_from_its_bandwidths_and_rings_keep_inside_them():
    # A hand-written profile: 40 hosts listed with their 4 leaves interleaved, bandwidths only. Rings of two hosts
    # must pair hosts of one leaf; in listing order every pair crosses the spine. Without the inferred leaves the
    # plan paired hosts across the spine too (slowest hop 6.2 GB/s, as Ray's order).
    leaves = [i % 4 for i in range(40)]
    bw = noisy_matrix(leaves, [12.5] * 40, 6.25, 0.03, seed=3)
    profile = {"format": MEASURED_FORMAT, "version": 1, "name": "hand-written",
               "hosts": [{"name": f"n{i:02d}", "gpus": 2} for i in range(40)], "host_bw_gbps": bw}
    topo = Topology.from_dict(profile)
    assert partition([topo.leaf_of(h) for h in topo.hosts]) == partition(leaves)
    aware, naive = (make_plan(topo, 80, 4, strategy=s) for s in ("aware", "naive"))
    for plan in (aware, naive):
        rings = [{topo.leaf_of(p.host) for p in plan.placements[i:i + 4]} for i in range(0, 80, 4)]
        assert all(len(r) == (1 if plan is aware else 2) for r in rings)
    assert aware.cost["slowest_hop_gbps"] > 1.5 * naive.cost["slowest_hop_gbps"]
    # Leaves the profile names stay as they are, and so does a fabric with no gap to tell leaves by.
    named = Topology.from_dict({**profile, "hosts": [{**h, "leaf": "one"} for h in profile["hosts"]]})
    assert {named.leaf_of(h) for h in named.hosts} == {"one"}
    flat = Topology.from_dict({**profile, "host_bw_gbps": noisy_matrix([0] * 40, [12.5] * 40, 12.5, 0.03, seed=3)})
    assert {flat.leaf_of(h) for h in flat.hosts} == {None}
