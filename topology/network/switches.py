"""Which hosts share a leaf switch, from what they measure to each other.

Hosts under one leaf reach each other at their own link speed; a flow to
another leaf also crosses an uplink, which on an oversubscribed fabric is
shared and slower, and always adds hops of latency. So the leaves are the
groups of hosts that all see each other clearly faster than they see
anyone else.

Algorithm (``leaf_groups``):

1. Symmetrise the bandwidth matrix (a pair is as fast as its slower
   direction) and divide each pair by the slower of the two hosts' best
   pairs, so a host with a slow link still looks "near" to its leaf-mates.
2. Find the first relative gap of at least ``gap`` going down the sorted
   values: above it is "same leaf", below it "across the spine". Without one
   (a non-blocking fabric, where single flows do not see uplinks), do the
   same on latency, then give up and call it one leaf.
3. Complete-linkage clustering cut at that gap: every pair inside a group
   is above it, so a single fast pair cannot chain two leaves together.
   Latency breaks ties between equally fast pairs: with rounds measured at
   once, a cross-leaf pair that ran alone on its uplink looks as fast as a
   same-leaf pair.

Labels win over inference: nodes that carry one of ``LEAF_LABELS`` (set by
the cluster operator or the cloud) are grouped by it (``leaf_names``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from topology.errors import ConfigError

LEAF_LABELS = (
    "ringleader.io/leaf",
    "ringleader.io/rack",
    "network.topology.nvidia.com/leaf",  # NVIDIA Topograph
    "topology.k8s.aws/network-node-layer-3",  # EKS: the network node an instance hangs from
)
"""Node labels that name a host's switch, most specific first."""

DEFAULT_GAP = 1.25
"""Same-leaf pairs must be this many times faster than cross-leaf ones. Measurement
noise on one link stays well under 10%; oversubscription starts at 2:1."""


TIE_BREAK = 1e-6
"""Weight of the latency distance next to the bandwidth one: it only orders equal pairs."""


def _first_gap(values: np.ndarray, gap: float) -> float | None:
    """The cut (geometric midpoint) at the first drop of ``gap`` or more going down ``values``."""
    v = np.unique(values[np.isfinite(values) & (values > 0)])[::-1]
    for hi, lo in zip(v, v[1:]):
        if hi / lo >= gap:
            return math.sqrt(hi * lo)
    return None


def _closeness(matrix: np.ndarray, higher_is_closer: bool) -> np.ndarray:
    m = np.minimum(matrix, matrix.T) if higher_is_closer else np.maximum(matrix, matrix.T)
    n = len(m)
    off = ~np.eye(n, dtype=bool)
    if not higher_is_closer:  # latency: closeness is inverse latency
        with np.errstate(divide="ignore"):
            m = np.where(m > 0, 1.0 / m, np.inf)
    best = np.array([m[i][off[i]].max() for i in range(n)])
    scale = np.minimum.outer(best, best)
    return np.where(off, m / scale, 1.0)


def leaf_groups(bw: Sequence[Sequence[float]], lat: Sequence[Sequence[float]] | None = None, gap: float = DEFAULT_GAP) -> list[int]:
    """Group hosts by the leaf switch they hang from.

    Parameters
    ----------
    bw : n x n matrix
        Bandwidth from host i to host j (any unit; the diagonal is ignored).
    lat : n x n matrix, optional
        Latency from host i to host j, used when bandwidth shows no gap.
    gap : float
        Smallest ratio between same-leaf and cross-leaf closeness that counts.

    Returns
    -------
    list of int
        Group of each host, numbered in order of first appearance
        (host 0 is in group 0).

    Raises
    ------
    ConfigError
        If a matrix is not square or not n x n, or a bandwidth is negative.

    Notes
    -----
    O(n^2 log n) for n hosts (scipy's complete linkage), deterministic.

    Examples
    --------
    >>> leaf_groups([[0, 50, 20, 20], [50, 0, 20, 20], [20, 20, 0, 49], [20, 20, 49, 0]])
    [0, 0, 1, 1]
    """
    b = np.asarray(bw, dtype=float)
    n = len(b)
    if b.shape != (n, n):
        raise ConfigError(f"bandwidth matrix must be n x n, got shape {b.shape}")
    if (b < 0).any():
        raise ConfigError("bandwidth matrix has a negative entry; bandwidths are GB/s >= 0")
    if n < 3:
        return [0] * n  # two hosts cannot tell a slow link from a far one
    candidates = [_closeness(b, higher_is_closer=True)]
    if lat is not None:
        la = np.asarray(lat, dtype=float)
        if la.shape != (n, n):
            raise ConfigError(f"latency matrix must be {n} x {n}, got shape {la.shape}")
        candidates.append(_closeness(la, higher_is_closer=False))
    off = ~np.eye(n, dtype=bool)
    for k, close in enumerate(candidates):
        cut = _first_gap(close[off], gap)
        if cut is None:
            continue
        # Distance 1 at the cut. Latency, when measured, breaks the ties among
        # equally fast pairs (a cross-leaf pair that happened to run alone is
        # as fast as a same-leaf one) without moving the cut.
        distance = np.log(np.clip(close, 1e-12, None)) / math.log(cut)
        if k + 1 < len(candidates):
            distance += TIE_BREAK * -np.log(np.clip(candidates[k + 1], 1e-12, None))
        np.fill_diagonal(distance, 0.0)
        tree = linkage(squareform(distance, checks=False), method="complete")
        labels = fcluster(tree, t=1.0, criterion="distance")
        order: dict[int, int] = {}
        return [order.setdefault(int(x), len(order)) for x in labels]
    return [0] * n


def label_leaf(labels: dict[str, str] | None) -> str | None:
    """The switch a node's labels name, if any (first of ``LEAF_LABELS`` present)."""
    for key in LEAF_LABELS:
        if labels and labels.get(key):
            return str(labels[key])
    return None


def leaf_names(
    bw: Sequence[Sequence[float]],
    labels: Sequence[dict[str, str] | None],
    lat: Sequence[Sequence[float]] | None = None,
    gap: float = DEFAULT_GAP,
) -> tuple[list[str], str]:
    """Name each host's leaf: from labels when every host has one, else inferred.

    Inferred groups take the label their labelled members agree on, so a
    partial labelling still names the switches; others are ``leaf0``, ``leaf1``...

    Returns
    -------
    (names, source)
        ``source`` is ``"labels"`` or ``"inferred"``.
    """
    given = [label_leaf(lab) for lab in labels]
    if given and all(given):
        return [str(g) for g in given], "labels"
    groups = leaf_groups(bw, lat, gap)
    names = {}
    for g in sorted(set(groups)):
        members = {given[i] for i, x in enumerate(groups) if x == g and given[i]}
        names[g] = members.pop() if len(members) == 1 else f"leaf{g}"
    return [names[g] for g in groups], "inferred"
