"""Make sure a stage's devices exist before it is profiled and planned.

A *slot* is what one rank takes: ``{GPU: 1, CPU: 1}`` on a GPU cluster (Ray
then sets CUDA_VISIBLE_DEVICES), ``{CPU: 1}`` on a cluster without GPUs, so
the demo recipe runs on a laptop. On an autoscaling cluster the stage's
slots are requested with ``ray.autoscaler.sdk.request_resources`` and waited
for; on a fixed cluster a stage that can never fit is refused before
anything starts.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

import ray

from topology.errors import ConfigError

log = logging.getLogger("ringleader")


class ResourcesUnavailable(RuntimeError):
    """The cluster did not get the slots a stage needs within the timeout."""


@dataclass(frozen=True)
class NodeInfo:
    """One alive Ray node, as far as placing ranks goes."""

    node_id: str
    gpus: int
    cpus: int
    memory: float = 0.0
    """Bytes of memory Ray manages on the node, its heap and object store together (about the node's RAM; 0: unknown)."""

    def slots(self, use_gpus: bool) -> int:
        """Ranks this node can hold: one GPU and one CPU each, or one CPU each."""
        return min(self.gpus, self.cpus) if use_gpus else self.cpus


@dataclass(frozen=True)
class ClusterView:
    """A snapshot of the alive nodes and the kind of slot ranks take."""

    nodes: list[NodeInfo]
    use_gpus: bool

    @classmethod
    def snapshot(cls, use_gpus: bool | None = None) -> "ClusterView":
        nodes = [
            NodeInfo(n["NodeID"], int(n["Resources"].get("GPU", 0)), int(n["Resources"].get("CPU", 0)),
                     float(n["Resources"].get("memory", 0)) + float(n["Resources"].get("object_store_memory", 0)))
            for n in ray.nodes() if n["Alive"]
        ]
        if use_gpus is None:
            use_gpus = any(n.gpus for n in nodes)
        return cls(nodes, use_gpus)

    @property
    def slots(self) -> dict[str, int]:
        """node_id -> ranks it can hold (nodes with none left out)."""
        return {n.node_id: k for n in self.nodes if (k := n.slots(self.use_gpus)) > 0}

    @property
    def total(self) -> int:
        return sum(self.slots.values())

    @property
    def unit(self) -> str:
        """What a slot is, for messages."""
        return "GPU" if self.use_gpus else "CPU slot"

    def bundle(self) -> dict[str, float]:
        return rank_bundle(self.use_gpus)


def rank_bundle(use_gpus: bool) -> dict[str, float]:
    """Ray resources of one rank (its placement-group bundle)."""
    return {"GPU": 1.0, "CPU": 1.0} if use_gpus else {"CPU": 1.0}


def autoscaling() -> bool:
    """Whether an autoscaler with node types of its own watches this cluster.

    Without an autoscaling config the monitor runs a read-only provider whose
    node types are named after the node ids (``node_<id>``); any other type
    name means a config that can launch nodes.
    """
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        raw = _internal_kv_get("__autoscaling_status")
    except Exception:  # noqa: BLE001 - no status means no autoscaler to ask
        raw = None
    if raw:
        mapping = (json.loads(raw).get("autoscaler_report") or {}).get("node_type_mapping") or {}
        return any(t != format_readonly_node_type(nid) for nid, t in mapping.items())
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001
        return False
    nodes = list(status.active_nodes) + list(status.idle_nodes)
    return any(n.ray_node_type_name and n.ray_node_type_name != format_readonly_node_type(n.node_id) for n in nodes)


def check_capacity(stages: list[tuple[str, int]], view: ClusterView, can_grow: bool) -> None:
    """Refuse, before anything starts, a stage a fixed-size cluster can never hold.

    Parameters
    ----------
    stages : (name, ranks) of every stage of the recipe.
    view : the cluster now.
    can_grow : an autoscaler may add nodes (then only the wait can tell).

    Raises
    ------
    ConfigError
        Naming the first stage that needs more slots than the cluster has.
    """
    if can_grow:
        return
    for name, want in stages:
        if want > view.total:
            raise ConfigError(
                f"stage {name!r} needs {want} {view.unit}s but the cluster has {view.total} "
                f"on {len(view.slots)} node(s) and no autoscaler; lower the stage's gpus or add nodes"
            )


def check_host_memory(stages: list[tuple[str, int, Callable[[int], float]]], view: ClusterView, can_grow: bool) -> None:
    """Refuse, before anything starts, a stage whose model no node of a fixed-size cluster can hold.

    Ranks that run a node out of memory are killed, and every retry meets
    the same; so what the busiest host needs (``need(ranks_per_host)``: to
    build the model, and on CPU slots to train it; ``launcher.runtime.controller.host_need``),
    with the ranks spread over every node with slots, must fit the largest node.

    Parameters
    ----------
    stages : (name, ranks, need) of every stage; ``need`` gives bytes for a number of ranks on one host.
    view : the cluster now.
    can_grow : an autoscaler may add nodes (then only the stage itself can tell).

    Raises
    ------
    ConfigError
        Naming the first stage that cannot fit, what it needs and what the largest node has.
    """
    nodes = [n for n in view.nodes if n.slots(view.use_gpus)]
    have = max((n.memory for n in nodes), default=0.0)
    if can_grow or not have:
        return
    for name, want, need in stages:
        spread = -(-want // len(nodes))
        if need(spread) > have:
            raise ConfigError(
                f"stage {name!r}: its model needs {need(spread) / 2**30:,.3g} GiB of memory on a host holding "
                f"{spread} of its {want} ranks, more than the {have / 2**30:,.3g} GiB of the largest node; "
                "use a smaller model or more nodes"
            )


def ensure(want: int, use_gpus: bool, timeout_s: float, can_grow: bool, at_least: int | None = None,
           note: Callable[[str], None] = log.info, poll_s: float = 1.0) -> ClusterView:
    """Wait until ``want`` slots exist (asking the autoscaler for them); return the cluster.

    With ``at_least`` (the stage's ``min_gpus``), a cluster with fewer than
    ``want`` but at least ``at_least`` slots is returned at once: the caller
    re-plans on fewer GPUs rather than wait.

    Raises
    ------
    ResourcesUnavailable
        After ``timeout_s`` with fewer than ``at_least or want`` slots, saying what is missing.
    """
    need = at_least or want
    view = ClusterView.snapshot(use_gpus)
    if view.total >= need:
        return view
    if can_grow:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[rank_bundle(use_gpus)] * want)
        note(f"asked the autoscaler for {want} {view.unit}s ({view.total} now); waiting up to {timeout_s:.0f} s")
    else:
        note(f"waiting up to {timeout_s:.0f} s for {need - view.total} more {view.unit}(s) to join ({view.total} now)")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        view = ClusterView.snapshot(use_gpus)
        if view.total >= want:
            return view
    if view.total >= need:
        return view
    per_rank = ", ".join(f"{k}: {v:g}" for k, v in rank_bundle(use_gpus).items())
    raise ResourcesUnavailable(
        f"needed {need} {view.unit}s, the cluster has {view.total} after {timeout_s:.0f} s: "
        f"{need - view.total} missing (each rank takes {{{per_rank}}})"
        + ("; check the autoscaler's node types and max_workers" if can_grow else "; start more nodes")
    )


def release_request() -> None:
    """Withdraw the standing autoscaler request so idle nodes can go away."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[])


def wait_for_dead(node_ids: list[str], timeout_s: float = 60.0, ping_s: float = 5.0) -> list[str]:
    """Nodes among ``node_ids`` that are gone, once Ray agrees.

    A killed host answers nothing at once but stays "alive" in Ray until its
    health checks run out; profiling it meanwhile would hang. A node that
    answers a ping is kept; one that does not is waited on until Ray marks it dead.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def ping() -> bool:
        return True

    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    suspects = [n for n in node_ids if n in alive]
    refs = {n: ping.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote() for n in suspects}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=ping_s)
    answered = {n for n, r in refs.items() if r in ready}
    silent = [n for n in suspects if n not in answered]
    for r in refs.values():
        if r not in ready:
            ray.cancel(r, force=True)
    deadline = time.monotonic() + timeout_s
    while silent and time.monotonic() < deadline:
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        if not any(n in alive for n in silent):
            break
        time.sleep(0.5)
    return [n for n in node_ids if n not in answered]
