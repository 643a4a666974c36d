"""One Ray actor per rank, each on the host and GPU its plan gave it.

The plan says rank -> (host, GPU). Ray is told the same thing twice: a
placement group with one bundle per rank, each bundle pinned to its host's
node by the ``ray.io/node-id`` label; then one actor per bundle. Both are
checked (``placement_group_table`` and each actor's own node id) before any
rank starts, because a rank on the wrong host silently puts a ring on slow links.

Each actor then gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT) and, on GPU hosts,
a CUDA_VISIBLE_DEVICES listing every GPU the stage holds on that host in
local-rank order: NCCL needs to see its peers' GPUs for peer-to-peer copies,
and ``cuda:LOCAL_RANK`` is then the rank's planned GPU among those Ray gave
the stage on that host.

Actors are named ``<stage>/rank-<k>@<host>`` (the dashboard's actor list and
each log line's prefix say which rank is which), and each writes its rank
log ``<stage dir>/logs/rank-<k>.log`` (see ``trainer.reporting.ranklog``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from topology.errors import ConfigError, first_line
from topology.planning.plan import Plan

log = logging.getLogger("ringleader")

NODE_ID_LABEL = "ray.io/node-id"


class PlacementFailed(RuntimeError):
    """The placement group could not be reserved where the plan says."""


class WorkerFailure(RuntimeError):
    """A rank failed or its worker (or host) died while the stage ran."""

    def __init__(self, rank: int, cause: str, node_id: str | None = None):
        super().__init__(f"rank {rank}: {cause}")
        self.rank, self.cause, self.node_id = rank, cause, node_id


@ray.remote(max_concurrency=2)
class RankWorker:
    """A rank's process. Two threads: one runs the stage, one answers metric polls."""

    def __init__(self, name: str = "") -> None:
        self._metrics: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._name = name

    def __repr__(self) -> str:
        """Ray prefixes this actor's log lines with it: ``(<stage>/rank-<k>@<host> pid=...)``."""
        return self._name or "RankWorker"

    def describe(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(),
                "gpu_ids": [int(g) for g in ray.get_gpu_ids()], "pid": os.getpid()}

    def serve_rendezvous(self, timeout_s: float) -> int:
        """Host the group's TCP store on this node's cluster address only; returns its port (MASTER_PORT).

        The store lives as long as this actor, and every rank, this one
        included, joins it as a client (torchrun's agent-store mode), so no
        rank opens a store of its own on every interface.
        """
        from topology.profiling.listen import store_server

        self._rendezvous = store_server(ray.util.get_node_ip_address(), timeout_s)
        return self._rendezvous.port

    def read_file(self, location: str) -> bytes | None:
        """The bytes at a path or object store URI as this host sees it (None: not there, or unreadable)."""
        from trainer import storage

        try:
            return storage.read_bytes(location)
        except Exception:  # noqa: BLE001 - a host that cannot read the run directory is the answer, not an error
            return None

    def init_group(self, env: dict[str, str], timeout_s: float) -> float:
        """Join the default process group from torchrun's variables; returns when all ranks are in."""
        os.environ.update(env)
        import torch.distributed as dist

        from trainer.engine import init_process_group

        init_process_group(timeout_s)
        dist.barrier()
        return time.time()

    def whoami(self) -> dict[str, Any]:
        """This rank as torch.distributed and the environment see it."""
        import torch.distributed as dist

        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")
        return {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "env": {k: os.environ.get(k) for k in keys},
                **self.describe()}

    def run_stage(self, stage: dict[str, Any], plan: dict[str, Any], verbose: bool = False) -> dict[str, Any]:
        import torch.distributed as dist

        from trainer import storage
        from trainer.reporting.ranklog import rank_logging

        rank = dist.get_rank()
        # Before the trainer's imports: DeepSpeed and transformers speak as they load.
        with rank_logging(storage.work_dir(stage["output_dir"]), rank, verbose=verbose):
            from trainer.config import StageConfig
            from trainer.stage import run_stage

            on_metrics = self._record if rank == 0 else None
            result = run_stage(StageConfig.from_dict(stage), Plan.from_dict(plan), on_metrics=on_metrics)
        return asdict(result) if is_dataclass(result) else dict(result)

    def _record(self, metrics: dict[str, Any]) -> None:
        with self._lock:
            self._metrics.append(dict(metrics))

    def metrics(self, since: int) -> list[dict[str, Any]]:
        with self._lock:
            return self._metrics[since:]


def actor_name(stage: str, rank: int, host: str) -> str:
    """``<stage>/rank-<k>@<host>``: how the dashboard, ``ray list actors`` and the logs name a rank."""
    return f"{stage}/rank-{rank}@{host}"


def release_names(names: list[str], timeout_s: float = 30.0) -> None:
    """Wait until Ray has let go of the names of killed actors (``ray.kill`` returns before it does)."""
    deadline = time.monotonic() + timeout_s
    for name in names:
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name)
            except ValueError:
                break
            time.sleep(0.1)


def rank_env(plan: Plan, rank: int, master_addr: str, master_port: int) -> dict[str, str]:
    """torchrun's environment for ``rank`` of ``plan``."""
    host = plan.placements[rank].host
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(plan.world_size),
        "LOCAL_RANK": str(plan.local_rank(rank)),
        "LOCAL_WORLD_SIZE": str(len(plan.ranks_on(host))),
        "GROUP_RANK": str(plan.hosts.index(host)),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        # Rank 0's actor already serves the store (``serve_rendezvous``): every rank joins as a client.
        "TORCHELASTIC_USE_AGENT_STORE": "True",
    }


def match_gpus(plan: Plan, rank_ids: list[int], gpu_ids: list[list[int]]) -> list[int]:
    """Which actor (index into the host's actors) each planned rank of one host gets.

    ``rank_ids`` are the host's ranks; ``gpu_ids[i]`` the GPUs Ray gave actor
    ``i`` there. Ranks sorted by planned GPU meet actors sorted by given GPU,
    so a rank gets exactly its planned GPU whenever Ray handed out the
    planned set (a whole host always), and the same order otherwise.
    """
    by_plan = sorted(rank_ids, key=lambda r: plan.placements[r].gpu)
    by_gpu = sorted(range(len(gpu_ids)), key=lambda i: gpu_ids[i] or [-1])
    out = [0] * len(rank_ids)
    for r, actor in zip(by_plan, by_gpu):
        out[rank_ids.index(r)] = actor
    return out


@dataclass
class WorkerGroup:
    """The placement group and rank actors of one stage attempt; ``workers[r]`` is rank r."""

    plan: Plan
    pg: Any
    workers: list[Any]
    envs: list[dict[str, str]]
    node_ids: list[str]
    stage: str = "stage"

    @classmethod
    def start(cls, plan: Plan, node_ids: list[str], bundle: dict[str, float], timeout_s: float = 120.0,
              stage: str = "stage") -> "WorkerGroup":
        """Reserve one bundle per rank on ``node_ids[rank]``, start the actors, give them their env.

        Raises
        ------
        PlacementFailed
            The group is not ready within ``timeout_s`` or a bundle or actor is not where planned.
        """
        pg = placement_group([dict(bundle)] * plan.world_size, strategy="PACK",
                             bundle_label_selector=[{NODE_ID_LABEL: n} for n in node_ids])
        group = cls(plan, pg, [], [], list(node_ids), stage)
        try:
            ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
            if not ready:
                raise PlacementFailed(f"placement group of {plan.world_size} x {bundle} not ready after {timeout_s:.0f} s; "
                                      "the planned hosts lack free resources")
            placed = placement_group_table(pg)["bundles_to_node_id"]
            wrong = [i for i in range(plan.world_size) if placed[i] != node_ids[i]]
            if wrong:
                raise PlacementFailed(f"bundles {wrong} landed off their planned hosts")
            group._start_actors(bundle, timeout_s)
        except BaseException:
            group.shutdown()
            raise
        return group

    def _start_actors(self, bundle: dict[str, float], timeout_s: float) -> None:
        plan = self.plan
        names = [actor_name(self.stage, r, plan.placements[r].host) for r in range(plan.world_size)]
        actors = [
            RankWorker.options(
                name=names[i], num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(names[i])
            for i in range(plan.world_size)
        ]
        self.workers = actors  # actor r is rank r (its name says so); shutdown() can reach them whatever happens next
        try:
            info = ray.get([a.describe.remote() for a in actors], timeout=timeout_s)
        except (GetTimeoutError, RayError) as exc:
            raise PlacementFailed(f"rank actors did not start within {timeout_s:.0f} s ({first_line(exc)})") from None
        for i, d in enumerate(info):
            if d["node_id"] != self.node_ids[i]:
                raise PlacementFailed(f"rank actor {i} runs on node {d['node_id'][:12]}, planned {self.node_ids[i][:12]}")
        # The GPU each rank drives: its planned one among those Ray gave the host's actors. Every
        # rank of a host sees all of them (CUDA_VISIBLE_DEVICES below), so actor r can drive it.
        infos: list[dict[str, Any]] = [{}] * plan.world_size
        for host in plan.hosts:
            ranks = plan.ranks_on(host)  # bundle i was pinned for rank i, so these actors are on `host`
            pick = match_gpus(plan, ranks, [info[r]["gpu_ids"] for r in ranks])
            for r, k in zip(ranks, pick):
                infos[r] = info[ranks[k]]
        master_port = ray.get(actors[0].serve_rendezvous.remote(timeout_s), timeout=timeout_s)
        self.envs = [rank_env(plan, r, infos[0]["ip"], master_port) for r in range(plan.world_size)]
        if bundle.get("GPU"):
            for host in plan.hosts:
                ranks = sorted(plan.ranks_on(host), key=plan.local_rank)
                visible = ",".join(str(infos[r]["gpu_ids"][0]) for r in ranks)
                for r in ranks:
                    self.envs[r]["CUDA_VISIBLE_DEVICES"] = visible

    def read_on_hosts(self, location: str, timeout_s: float = 60.0) -> dict[str, bytes | None]:
        """Host -> what one rank actor of that host reads at ``location`` (``rundir.check_shared``)."""
        first = {h: self.plan.ranks_on(h)[0] for h in self.plan.hosts}
        got = ray.get([self.workers[r].read_file.remote(location) for r in first.values()], timeout=timeout_s)
        return dict(zip(first, got))

    def init_process_group(self, timeout_s: float = 300.0) -> None:
        """Every rank joins the default group (and passes a barrier)."""
        refs = [w.init_group.remote(env, timeout_s) for w, env in zip(self.workers, self.envs)]
        self._wait(refs, timeout_s, lambda: None)

    def run_stage(self, stage: dict[str, Any], on_metrics: Callable[[dict[str, Any]], None], poll_s: float = 0.5,
                  check: Callable[[], None] | None = None, verbose: bool = False) -> dict[str, Any]:
        """Run the stage on every rank, passing rank 0's metrics to ``on_metrics`` as they come.

        ``check`` is called after each poll and may raise (a ``WorkerFailure``) to end the attempt;
        ``verbose`` leaves the ranks' stdout and stderr to Ray (the driver's console) as well as their logs.
        """
        plan = self.plan.to_dict()
        refs = [w.run_stage.remote(stage, plan, verbose) for w in self.workers]
        seen = 0

        def drain() -> None:
            nonlocal seen
            try:
                new = ray.get(self.workers[0].metrics.remote(seen), timeout=max(poll_s * 4, 5.0))
            except (RayActorError, GetTimeoutError):
                return  # a dead rank 0 surfaces through its run_stage ref
            seen += len(new)
            for m in new:
                on_metrics(m)

        def tick() -> None:
            drain()
            if check is not None:
                check()

        results = self._wait(refs, None, tick, poll_s)
        drain()
        return results[0]

    def _wait(self, refs: list[Any], timeout_s: float | None, tick: Callable[[], None], poll_s: float = 0.5) -> list[Any]:
        """Results of ``refs`` in rank order; the first failure raises ``WorkerFailure``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=poll_s)
            tick()
            for ref in done:
                self._check(refs.index(ref), ref)
            if deadline is not None and pending and time.monotonic() > deadline:
                rank = refs.index(pending[0])
                raise WorkerFailure(rank, f"no answer after {timeout_s:.0f} s", self.node_ids[rank])
        return ray.get(refs)

    def _check(self, rank: int, ref: Any) -> None:
        try:
            ray.get(ref)
        except RayTaskError as exc:
            cause = exc.cause if exc.cause is not None else exc
            if isinstance(cause, ConfigError):
                raise ConfigError(str(cause)) from None  # bad input: retrying cannot help
            raise WorkerFailure(rank, f"{type(cause).__name__}: {first_line(cause)}", self.node_ids[rank]) from None
        except RayError as exc:  # the actor, its process or its host died
            raise WorkerFailure(rank, f"worker died ({type(exc).__name__}: {first_line(exc)})", self.node_ids[rank]) from None

    def shutdown(self) -> None:
        """Kill the rank actors and release the placement group; safe to call twice."""
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead is fine
                pass
        if self.workers:
            names = [actor_name(self.stage, r, p.host) for r, p in enumerate(self.plan.placements)]
            release_names(names)  # a retry names its actors the same
        self.workers = []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001
                pass
            self.pg = None


@ray.remote(num_cpus=0)
def _read_file(location: str) -> bytes | None:
    from trainer import storage

    try:
        return storage.read_bytes(location)
    except Exception:  # noqa: BLE001 - a node that cannot read the run directory is the answer, not an error
        return None


def read_on_nodes(location: str, node_ids: list[str], timeout_s: float = 60.0) -> dict[str, bytes | None]:
    """Node id -> what a task pinned to that node reads at ``location`` (``rundir.check_shared`` before any rank
    actor exists, e.g. before the cluster tokenises a stage's data into the run's storage)."""
    refs = [_read_file.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(location)
            for n in node_ids]
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    return dict(zip([ips.get(n, n[:12]) for n in node_ids], ray.get(refs, timeout=timeout_s)))
