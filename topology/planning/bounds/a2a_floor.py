"""A joint lower bound on the Ulysses all-to-all: every group priced together, over the GPUs they must share.

The all-to-all term of a step is the slowest transfer among all Ulysses
groups' pairs running at once (``topology.cost.StepModel``). It depends only
on which GPUs form each group, not on the ranks' order inside a group, nor
on the ring or gradient flows. Bounding one group at a time
(``topology.planning.bounds.rates.gpu_access_bound``, ``topology.planning.search.lookahead``) lets every
group take the best GPUs of the pool; when the groups must together fill
the pool (or all but a known number of its GPUs), they cannot, and their
flows contend on the same NIC, socket and PCIe links. The minimum of the
term over every partition of the pool into groups is a floor for every
rank order of the shape.

Algorithm
---------
Branch and bound over partitions, GPU by GPU (twins of one class next to
each other): a GPU joins a group with room, the first empty group (groups
are interchangeable: labelled by first use), or the unused GPUs while
``len(pool) - world`` of them are left. Twins are interchangeable too: a
twin joins a group of label no smaller than the previous twin's, so a
partition is visited once up to group labels and twin swaps.

A partial partition (GPUs in the search's order up to some point) bounds
every completion by the largest of

* its pairs, all on the links at once (later pairs only add load);
* the flows still to come of the GPUs it placed: a GPU in a group of ``k``
  members so far has ``u - k`` peers to come; at most as many as its host
  has free GPUs sit on its host, the rest elsewhere. Each such flow surely
  loads the links common to the GPU's routes to (and from) every candidate
  peer, so those loads are added; some flow crosses each busy link at no
  more than its share, after no less than the quickest route through it;
* what the free GPUs allow each open group alone (``topology.planning.search.lookahead``).

With ``ring``, the same search bounds the attention time instead (ring
hops and all-to-all together): each partition is priced with the ring hops
its groups force, and each partial one by its groups with members
(``topology.planning.bounds.ring_floor``).

A branch whose bound is no sooner than the best known is cut; children
are tried soonest first. Stopped at ``node_cap`` nodes, the floor is the
smallest bound among the branches left open (and the best partition
found), which still bounds every partition. On four g6e hosts (32 GPUs)
the search ends in a few hundred nodes for Ulysses 2 to 8: a host whose
GPUs are all placed fixes its NICs' load, which decides the all-to-all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from topology.cost import StepModel, transfers
from topology.planning.bounds.hop_latency import route_patterns
from topology.planning.bounds.rates import min_route_latency, ring_bandwidth_bound
from topology.planning.bounds.ring_floor import RingPricer, pool_units
from topology.planning.search.lookahead import PairRates, all_to_all_reach

FLOOR_NODES = 3_000
"""Partial partitions the joint floor visits at most (about a second on one core for 32 GPUs)."""
FLOOR_GPUS = 64
"""Pools of at most this many GPUs get the joint floor: its pair matrix grows with the square of the pool."""


@dataclass
class JointFloor:
    """The floor and how it was found."""

    seconds: float
    """Lower bound on the all-to-all term (forward and backward, as ``StepModel.figures``' ``a2a``) of every order."""
    exact: bool
    """True when the search finished: ``seconds`` is the term of a partition, the best one."""
    nodes: int
    groups: list[list[str]] | None = None
    """The best partition found (None when none was completed)."""


def joint_all_to_all_floor(sm: StepModel, pool: list[str], classes: list[list[str]], best_s: float = math.inf,
                           node_cap: float = FLOOR_NODES, ring: bool = False) -> JointFloor:
    """The smallest all-to-all term over every partition of ``pool`` into ``sm``'s Ulysses groups.

    Parameters
    ----------
    sm
        The shape and the flow model that prices it.
    pool
        The GPUs a plan may use; ``sm.world`` of them hold ranks.
    classes
        Twin classes of the pool (``topology.planning.search.optimise.twin_classes``): GPUs whose routes are alike.
    best_s
        All-to-all term of an order known (it seeds the cut): the floor is never above it.
    node_cap
        Nodes after which the search stops with the floor of the branches left open.
    ring
        Price the ring hops too (``topology.planning.bounds.ring_floor``): the floor is then of the attention time
        (``StepModel.attention``: ring and all-to-all together), and ``best_s`` is in those terms.

    Returns
    -------
    JointFloor
        ``seconds`` is 0 when the shape has no all-to-all.
    """
    u = sm.ulysses
    if u < 2 or not sm.a2a_pairs:
        return JointFloor(0.0, True, 0)
    spare = len(pool) - sm.world
    if spare < 0:
        return JointFloor(math.inf, True, 0)
    gpus = [g for c in classes for g in c if g in set(pool)]
    twin_of_prev = [i > 0 and any(gpus[i - 1] in c and gpus[i] in c for c in classes) for i in range(len(gpus))]
    n, m = len(gpus), sm.world // u
    pr = PairRates(sm.flows, gpus)
    rates = sm.rates
    host = [sm.topo.host_of(g) for g in gpus]
    cap = np.array([[(rates.intra_host_gbps if host[i] == host[j] else rates.inter_host_gbps) or math.inf
                     for j in range(n)] for i in range(n)])
    nbytes, eff = sm.a2a_per_peer, rates.network_efficiency
    load = np.zeros(pr.links + 1)  # the padding link carries nothing
    members: list[list[int]] = [[] for _ in range(m)]
    pairs: list[tuple[int, int]] = []
    label = [0] * n
    """Bin of each GPU placed: a group, or -1 for unused."""
    state = {"best": best_s, "groups": None, "nodes": 0}
    open_bounds: list[list[float]] = []
    """Bounds of the children not yet tried, per depth (what a stop leaves open)."""

    def add(i: int, g: int, sign: int) -> None:
        for j in members[g]:
            for a, b in ((i, j), (j, i)):
                np.add.at(load, pr.ids[a, b], sign * pr.fracs[a, b])
                if sign > 0:
                    pairs.append((a, b))
                else:
                    pairs.pop()
        load[-1] = 0.0

    free = np.ones(n, dtype=bool)
    bw = np.append(sm.flows.link_bandwidths(), math.inf)
    group_of = np.full(n, -1)
    # What every flow of a GPU surely loads (the links common to its routes to all candidates): to or from every
    # other GPU, and to or from every GPU on another host (once its own host has no free GPU left).
    dense = np.zeros((n, n, pr.links + 1))
    np.add.at(dense, (np.arange(n)[:, None, None], np.arange(n)[None, :, None], pr.ids), pr.fracs)
    off = ~pr.diagonal
    remote = np.array([[host[a] != host[b] for b in range(n)] for a in range(n)])
    prefix_all = np.zeros((n, pr.links + 1))
    prefix_remote = np.zeros((n, pr.links + 1))
    for x in range(n):
        prefix_all[x] = dense[x][off[x]].min(axis=0) + dense[:, x][off[x]].min(axis=0)
        if remote[x].any():
            prefix_remote[x] = dense[x][remote[x]].min(axis=0) + dense[:, x][remote[x]].min(axis=0)
    lat_via = np.full(pr.links + 1, math.inf)
    """µs of the quickest route through each link: a flow there waits at least that long."""
    np.minimum.at(lat_via, pr.ids[off], np.where(pr.fracs[off] > 0, pr.latency[off][:, None], math.inf))
    host_ids = {h: k for k, h in enumerate(dict.fromkeys(host))}
    host_of = np.array([host_ids[h] for h in host])
    pricer = _ring_pricer(sm, gpus, dense, bw, lat_via) if ring and sm.ring > 1 else None

    def forced(i: int) -> float:
        """Bound from the loads the placed GPUs' flows still to come surely add (GPUs ``0..i - 1`` placed)."""
        sizes = np.array([len(g) for g in members] + [0])
        rem = np.where(group_of[:i] >= 0, u - sizes[group_of[:i]], 0).astype(float)
        if not rem.any():
            return 0.0
        # At most as many of a GPU's peers to come as its host has free GPUs can sit on that host; the rest are remote.
        local = np.minimum(rem, np.bincount(host_of[i:], minlength=len(host_ids))[host_of[:i]])
        extra = local @ prefix_all[:i] + (rem - local) @ prefix_remote[:i]
        total = load + extra
        busy = total > 1e-9
        if not busy.any():
            return 0.0
        # Some flow crosses each busy link, at no more than its share and after no less than the quickest route there.
        return 2 * float(transfers(nbytes, bw[busy] / total[busy] * eff, lat_via[busy]).max())

    def slowest(i: int) -> float:
        """Bound of the partial partition of GPUs ``0..i - 1``: its pairs now, and what the free GPUs allow the rest."""
        free[:i], free[i:] = False, True
        open_groups = [(g, u - len(g)) for g in members if len(g) < u]
        ahead = 2 * all_to_all_reach(pr, load[:-1], nbytes, eff, free, open_groups, u) if i < n else 0.0
        ahead = max(ahead, forced(i))
        if not pairs:
            return ahead
        a, b = np.array(pairs).T
        with np.errstate(divide="ignore"):
            gbps = (pr.bw_at[a, b] / load[pr.ids[a, b]]).min(axis=1)
        gbps = np.minimum(gbps * eff, cap[a, b])
        return max(ahead, 2 * float(transfers(nbytes, gbps, pr.latency[a, b]).max()))

    def score(i: int) -> float:
        """Bound of the partial partition (GPUs ``0..i - 1`` placed): the all-to-all, or with the ring, attention."""
        a2a = slowest(i)
        if pricer is None:
            return a2a
        return pricer.partial([g for g in members if g], i, any(not g for g in members), a2a)

    class _Stop(Exception):
        pass

    i_now = [0]

    def visit(i: int) -> None:
        i_now[0] = i
        if i == n:
            t = slowest(n)
            if pricer is not None:
                t = pricer.leaf([list(g) for g in members], t, state["best"])
            if t < state["best"]:
                state["best"], state["groups"] = t, [[gpus[k] for k in g] for g in members]
            return
        used = sum(label[k] == -1 for k in range(i))
        first_empty = next((g for g in range(m) if not members[g]), None)
        options = [g for g in range(m) if 0 < len(members[g]) < u] + ([first_empty] if first_empty is not None else [])
        if used < spare:
            options.append(-1)
        if twin_of_prev[i]:
            options = [g for g in options if g >= label[i - 1]]
        children = []
        for g in options:
            state["nodes"] += 1
            if state["nodes"] > node_cap:
                raise _Stop
            group_of[i] = g
            if g >= 0:
                add(i, g, +1)
                members[g].append(i)
                children.append((score(i + 1), g))
                members[g].pop()
                add(i, g, -1)
            else:
                children.append((score(i + 1), g))
        children.sort()
        left = [b for b, _ in children]
        open_bounds.append(left)
        for bound, g in children:
            left.pop(0)
            if bound >= state["best"]:
                break
            label[i] = group_of[i] = g
            if g >= 0:
                add(i, g, +1)
                members[g].append(i)
            visit(i + 1)
            if g >= 0:
                members[g].pop()
                add(i, g, -1)
        left.clear()
        open_bounds.pop()

    try:
        visit(0)
    except _Stop:
        pending = [score(i_now[0]), *(b for level in open_bounds for b in level)]  # the node it stopped at, and those left
        return JointFloor(min([state["best"], *pending]), False, state["nodes"], state["groups"])
    return JointFloor(state["best"], True, state["nodes"], state["groups"])


def _ring_pricer(sm: StepModel, gpus: list[str], dense: np.ndarray, bw: np.ndarray, lat_via: np.ndarray):
    """The ring pricing of ``topology.planning.bounds.ring_floor`` over these GPUs' routes."""
    patterns = route_patterns(sm, gpus)
    hop_cap = ring_bandwidth_bound(sm.topo, sm.dp * sm.ulysses, sm.ring)
    return RingPricer(sm, dense, bw, lat_via, pool_units(sm, gpus, dense, lat_via), min_route_latency(sm.topo, gpus),
                      hop_cap, patterns.below)
