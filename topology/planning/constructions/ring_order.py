"""Order the hosts of one ring: the bottleneck travelling-salesman problem.

A ring visits each of its hosts once; its speed is set by its slowest hop,
so the host order should maximise the smallest bandwidth between
consecutive hosts (a bottleneck Hamiltonian cycle). Among orders with the
same bottleneck it should change switches as rarely as possible: on a tree
fabric, a ring that visits each leaf's hosts in one run crosses every
uplink once per direction, so it shares no link with itself.

Algorithms:

* ``exact_cycle`` (up to ``EXACT_LIMIT`` hosts): binary search over the
  distinct bandwidths for the largest threshold whose graph still has a
  Hamiltonian cycle, then Held-Karp dynamic programming for the fewest
  switch changes on that graph. O(2^n n^2 log n).
* ``greedy_cycle`` (more hosts): hosts grouped by switch, each group chained
  by widest-next-hop, then 2-opt moves that remove the weakest edge.
  O(n^2) per improving pass.

Inside a host the order follows PCIe (``locality_order``); a host that a
longer ring passes through is entered and left next to its NIC
(``through_order``).
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence, TypeVar

from topology.network.routing import FlowModel
from topology.network.model import Topology

H = TypeVar("H", bound=Hashable)
EXACT_LIMIT = 9
"""Largest ring (in hosts) ordered by exact search."""


def bottleneck_cycle(
    nodes: Sequence[H], bw: Callable[[H, H], float], group: Callable[[H], Hashable] = lambda _: None
) -> list[H]:
    """A cycle through ``nodes`` with the widest slowest edge, then fewest group changes.

    Parameters
    ----------
    nodes
        Hosts of one ring; ties are broken by this order (deterministic).
    bw
        Symmetric bandwidth between two hosts.
    group
        Switch of a host; changing group between consecutive hosts costs one.

    Returns
    -------
    list
        The hosts in ring order, starting with ``nodes[0]``.

    Examples
    --------
    >>> fast = {frozenset("ab"), frozenset("bc"), frozenset("cd"), frozenset("da")}
    >>> bottleneck_cycle("abcd", lambda x, y: 10 if frozenset((x, y)) in fast else 1)
    ['a', 'b', 'c', 'd']
    >>> bottleneck_cycle("acbd", lambda x, y: 10 if frozenset((x, y)) in fast else 1)
    ['a', 'b', 'c', 'd']
    """
    nodes = list(nodes)
    if len(nodes) <= 2:
        return nodes
    if len(nodes) <= EXACT_LIMIT:
        return exact_cycle(nodes, bw, group)
    return greedy_cycle(nodes, bw, group)


def exact_cycle(nodes: Sequence[H], bw: Callable[[H, H], float], group: Callable[[H], Hashable]) -> list[H]:
    """Exact bottleneck cycle with the fewest group changes; see the module docstring."""
    n = len(nodes)
    w = [[bw(a, b) if a != b else 0.0 for b in nodes] for a in nodes]
    g = [group(a) for a in nodes]
    change = [[int(g[i] != g[j]) for j in range(n)] for i in range(n)]
    values = sorted({w[i][j] for i in range(n) for j in range(n) if i != j})
    # Largest threshold that still has a Hamiltonian cycle (feasibility is monotone).
    lo, hi = 0, len(values) - 1
    best = _held_karp(w, change, values[0])
    while lo < hi:
        mid = (lo + hi + 1) // 2
        found = _held_karp(w, change, values[mid])
        if found is None:
            hi = mid - 1
        else:
            lo, best = mid, found
    return [nodes[i] for i in best]


def _held_karp(w: list[list[float]], change: list[list[int]], t: float) -> list[int] | None:
    """Cycle from node 0 using edges >= t with the fewest group changes, or None."""
    n = len(w)
    full = (1 << n) - 1
    inf = n + 1
    cost = [[inf] * n for _ in range(1 << n)]
    back = [[-1] * n for _ in range(1 << n)]
    cost[1][0] = 0
    for mask in range(1, full + 1, 2):  # every path starts at node 0
        row = cost[mask]
        for j in range(n):
            cj = row[j]
            if cj >= inf:
                continue
            for k in range(1, n):
                if mask >> k & 1 or w[j][k] < t:
                    continue
                nxt = mask | 1 << k
                ck = cj + change[j][k]
                if ck < cost[nxt][k]:
                    cost[nxt][k], back[nxt][k] = ck, j
    end = min((j for j in range(1, n) if w[j][0] >= t and cost[full][j] < inf),
              key=lambda j: (cost[full][j] + change[j][0], j), default=None)
    if end is None:
        return None
    order, mask, j = [], full, end
    while j != -1:
        order.append(j)
        mask, j = mask ^ (1 << j), back[mask][j]
    order.reverse()
    # A cycle and its reverse cost the same; take the one that leaves node 0 for the lower index.
    return order if order[1] < order[-1] else [0, *order[:0:-1]]


def greedy_cycle(nodes: Sequence[H], bw: Callable[[H, H], float], group: Callable[[H], Hashable]) -> list[H]:
    """Switch-grouped widest-next chain, improved by bottleneck 2-opt; see the module docstring."""
    groups: dict[Hashable, list[H]] = {}
    for h in nodes:
        groups.setdefault(group(h), []).append(h)
    order: list[H] = []
    for members in groups.values():
        chain = [members[0]]
        rest = members[1:]
        while rest:
            nxt = max(rest, key=lambda h: bw(chain[-1], h))  # first of the widest: deterministic
            rest.remove(nxt)
            chain.append(nxt)
        order.extend(chain)
    return _two_opt(order, bw)


def _two_opt(order: list[H], bw: Callable[[H, H], float], max_passes: int = 200) -> list[H]:
    """Replace the weakest edge and another by two wider ones while such a move exists.

    Each move raises the bottleneck or removes a copy of it, so it terminates.
    """
    n = len(order)
    for _ in range(max_passes):
        edge = [bw(order[i], order[(i + 1) % n]) for i in range(n)]
        i = min(range(n), key=edge.__getitem__)
        for j in range(n):
            if j in (i, (i - 1) % n, (i + 1) % n):
                continue
            a, b = min(i, j), max(i, j)
            if min(bw(order[a], order[b]), bw(order[a + 1], order[(b + 1) % n])) > edge[i]:
                order[a + 1:b + 1] = order[a + 1:b + 1][::-1]
                break
        else:
            return order
    return order


# ------------------------------------------------------------------ GPUs inside a host
def locality_order(topo: Topology, host: str) -> list[str]:
    """A host's GPUs in PCIe order: depth-first from the NIC, a switch's GPUs before what lies beyond it.

    Consecutive GPUs then share the nearest switch, so a run of ``c`` of them
    is the tightest group of ``c`` and a cycle through all crosses every
    internal link once per direction.
    """
    cache = topo.__dict__.setdefault("_locality_orders", {})
    sig = topo.host_signature(host)
    gpus = topo.gpus(host)
    by_index = {topo.graph.nodes[x]["index"]: x for x in gpus}
    if sig not in cache or len(sig) == 1:  # hosts built alike share one walk (a unique host keys by its id)
        cache[sig] = [topo.graph.nodes[x]["index"] for x in _locality_walk(topo, host, gpus)]
    return [by_index[i] for i in cache[sig]]


def nic_groups(topo: Topology, host: str) -> list[list[str]]:
    """A host's GPUs by the NIC they leave through, each group in PCIe order, the groups in PCIe order."""
    groups: dict[str | None, list[str]] = {}
    for gpu in locality_order(topo, host):
        groups.setdefault(topo.routes.nic_of(gpu), []).append(gpu)
    return list(groups.values())


def nic_spread_order(topo: Topology, host: str, width: int | None = None) -> list[str]:
    """A host's GPUs taken from each NIC's GPUs in turn (each NIC's in PCIe order).

    The first ``k`` of them, for ``k`` up to the NIC count, each leave the
    host through a NIC of their own: a host lending a few GPUs to rings that
    span hosts should lend these. With ``width``, NICs are taken ``width``
    at a time in PCIe order and only their GPUs interleaved: runs of
    ``width`` GPUs (a Ulysses group, whose members sit on different rings)
    then use ``width`` different NICs, and the runs still follow PCIe order.
    """
    runs = nic_groups(topo, host)
    width = width or len(runs)
    out: list[str] = []
    for i in range(0, len(runs), width):
        chunk = runs[i:i + width]
        out.extend(run[j] for j in range(max(map(len, chunk))) for run in chunk if j < len(run))
    return out


def _locality_walk(topo: Topology, host: str, gpus: list[str]) -> list[str]:
    nics = topo.nics(host)
    g = topo.graph
    order, seen = [], set()

    def key(item: tuple[str, dict]) -> tuple:
        node, data = item
        return (g.nodes[node]["kind"] != "gpu", -data["bw_gbps"], g.nodes[node].get("index", 0), node)

    stack = [nics[0] if nics else gpus[0]]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if g.nodes[node]["kind"] == "gpu":
            order.append(node)
        nbrs = sorted(((v, d) for v, d in g.adj[node].items() if v not in seen and g.nodes[v].get("host") == host), key=key)
        stack.extend(v for v, _ in reversed(nbrs))
    return order + [x for x in gpus if x not in seen]


def through_order(topo: Topology, host: str, block: int, flows: FlowModel, cuts: dict | None = None) -> list[str]:
    """A host's GPUs as one run of a longer ring: entered and left through the NIC.

    The PCIe-order cycle is cut next to the NIC, at a Ulysses-block
    boundary, where the run's flows (NIC -> first block, block -> block,
    last block -> NIC) have the widest slowest link; ties go to the cut whose
    end GPUs sit nearest the NIC.
    """
    base = locality_order(topo, host)
    nics = topo.nics(host)
    cuts = {} if cuts is None else cuts
    if not nics or len(base) <= block:
        return base
    key = (topo.host_signature(host), block)
    if key not in cuts:  # hosts of a preset or a profiled cluster share a few layouts: solve each once
        cuts[key] = _best_cut(base, nics[0], block, flows)
    return base[cuts[key]:] + base[:cuts[key]]


def _best_cut(base: list[str], nic: str, block: int, flows: FlowModel) -> int:
    best_key, best = None, 0
    for cut in range(0, len(base), block):
        order = base[cut:] + base[:cut]
        blocks = [order[i:i + block] for i in range(0, len(order), block)]
        ends = [(nic, gpu) for gpu in blocks[0]] + [(gpu, nic) for gpu in blocks[-1]]
        inner = [(a[u], b[u]) for a, b in zip(blocks, blocks[1:]) for u in range(min(len(a), len(b)))]
        rates = flows.bandwidths(ends + inner)
        key = (-min(r for r, _ in rates), sum(len(flows.path(a, b)) for a, b in ends), cut)
        if best_key is None or key < best_key:
            best_key, best = key, cut
    return best
