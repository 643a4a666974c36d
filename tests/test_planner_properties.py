"""Properties every plan has, on generated clusters and shapes (hypothesis)."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from topology.planning.planner import STRATEGIES, make_plan
from topology.network.presets import g6e, l40s_host, leaf_spine


@st.composite
def problems(draw):
    kind = draw(st.sampled_from(["host", "g6e", "leafspine"]))
    if kind == "host":
        topo = l40s_host(draw(st.sampled_from([2, 4])))
    elif kind == "g6e":
        topo = g6e(draw(st.integers(1, 4)))
    else:
        topo = leaf_spine(hosts=draw(st.integers(2, 8)), hosts_per_leaf=draw(st.integers(1, 4)),
                          oversubscription=draw(st.sampled_from([1.0, 2.0, 4.0])),
                          degraded=draw(st.dictionaries(st.integers(0, 1), st.sampled_from([1.0, 6.0]), max_size=1)))
    cp = draw(st.sampled_from([c for c in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32) if c <= topo.num_gpus]))
    gpus = cp * draw(st.integers(1, topo.num_gpus // cp))
    ulysses = draw(st.sampled_from([u for u in (1, 2, 4) if cp % u == 0]))
    strategy = draw(st.sampled_from(list(STRATEGIES)))
    return topo, gpus, cp, ulysses, strategy


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.integers(0, 3))
def test_every_plan_is_a_valid_layout(problem, seed):
    topo, gpus, cp, ulysses, strategy = problem
    plan = make_plan(topo, gpus, cp, ulysses, seq_len=2 * cp * 128, strategy=strategy, seed=seed)
    world = list(range(gpus))
    g = plan.groups

    # Each GPU of the topology is used once.
    used = [topo.gpu_id(p.host, p.gpu) for p in plan.placements]
    assert len(set(used)) == gpus

    # Rings are cycles over distinct ranks, ring x ulysses = cp of them per sequence.
    assert all(len(r) == cp // ulysses and len(set(r)) == len(r) for r in g.ring_groups)
    assert sorted(sum(g.ring_groups, [])) == world
    # DP groups cover every rank once; Ulysses groups and rings sit inside one cp group.
    assert sorted(sum(g.dp_groups, [])) == world and all(len(d) == gpus // cp for d in g.dp_groups)
    cp_of = {r: i for i, grp in enumerate(g.cp_groups) for r in grp}
    for group in g.ulysses_groups + g.ring_groups:
        assert len({cp_of[r] for r in group}) == 1

    # The cost model's figures are finite and the bound is never beaten.
    c = plan.cost
    assert c["ring_step_fwd_s"] >= c["bound_ring_step_s"] * (1 - 1e-9)
    if c["slowest_hop_gbps"] is not None:
        assert c["slowest_hop_gbps"] <= c["bound_hop_gbps"] * (1 + 1e-9)
    assert 0 < c["mfu"] < 1 and c["step_time_s"] >= c["bound_step_s"] * (1 - 1e-9)

    if strategy == "aware":
        # Never worse than Ray's order by the cost model, and reproducible.
        naive = make_plan(topo, gpus, cp, ulysses, seq_len=2 * cp * 128, strategy="naive")
        assert c["step_time_s"] <= naive.cost["step_time_s"] * (1 + 1e-7)
        assert make_plan(topo, gpus, cp, ulysses, seq_len=2 * cp * 128).placements == plan.placements
        # Proven optimal, or the plan states how far from the bound it may be: never a silent claim.
        found = c["search"]
        if found["optimal"]:
            assert found["gap"] == 0
        else:
            assert found["gap"] > 0 and abs(found["gap"] - (c["step_time_s"] / c["bound_step_s"] - 1)) <= 1e-5
