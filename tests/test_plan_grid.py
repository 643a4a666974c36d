"""The rank grid: every group is a slice of arange(world).reshape(dp, ring, ulysses)."""

import numpy as np
import pytest

from topology.errors import ConfigError
from topology.planning.plan import GroupLayout, Plan, RankPlacement


@pytest.mark.parametrize("dp,ring,ulysses", [(1, 1, 1), (2, 2, 1), (2, 2, 2), (3, 4, 2), (1, 8, 1)])
def test_groups_are_slices_of_the_grid(dp, ring, ulysses):
    grid = np.arange(dp * ring * ulysses).reshape(dp, ring, ulysses)
    g = GroupLayout.from_grid(dp, ring, ulysses)
    assert g.cp_groups == [grid[d].ravel().tolist() for d in range(dp)]
    assert g.ring_groups == [grid[d, :, u].tolist() for d in range(dp) for u in range(ulysses)]
    assert g.ulysses_groups == [grid[d, r, :].tolist() for d in range(dp) for r in range(ring)]
    assert g.dp_groups == [grid[:, r, u].tolist() for r in range(ring) for u in range(ulysses)]
    for groups in (g.cp_groups, g.ring_groups, g.ulysses_groups, g.dp_groups):
        assert sorted(r for grp in groups for r in grp) == list(range(dp * ring * ulysses))


def _plan(world=8, dp=2, cp=4, ulysses=2):
    return Plan("aware", dp, cp, ulysses, 1024, [RankPlacement(r, f"h{r // 4}", r % 4) for r in range(world)])


def test_plan_round_trips_through_json(tmp_path):
    plan = _plan()
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again == plan
    assert again.ring == 2 and again.local_rank(5) == 1 and again.hosts == ["h0", "h1"]


def test_plan_rejects_groups_that_do_not_match_the_grid():
    data = _plan().to_dict()
    data["ring_groups"][0] = [0, 3]
    with pytest.raises(ConfigError, match="ring_groups"):
        Plan.from_dict(data)


@pytest.mark.parametrize("kwargs,match", [
    (dict(world=8, dp=3, cp=4, ulysses=1), r"dp\(3\) \* cp\(4\) != world_size\(8\)"),
    (dict(world=8, dp=2, cp=4, ulysses=3), "ulysses"),
])
def test_plan_rejects_bad_shapes(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        _plan(**kwargs)
