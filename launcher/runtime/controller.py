"""The stage loop: a recipe's stages, one after another, on a Ray cluster.

For each stage::

    resources -> profile -> plan -> placement group + one actor per rank -> train -> next stage

and, when a worker or host dies mid-stage: tear the group down, wait until
Ray agrees which hosts are gone, re-profile the hosts that remain, re-plan
(on fewer GPUs if the stage's ``min_gpus`` allows, else after waiting for a
replacement), and start again; the trainer resumes from the stage's newest
DeepSpeed checkpoint. A stage whose steps stop coming (``watchdog``) is
retried the same way. Retries are bounded by ``recipe.max_retries`` and each
is logged with its cause and recorded in the stage's metrics.jsonl.

The run directory is locked for the run (``lock``), and a stage it already
holds is skipped or resumed only if its fingerprint matches (``identity``).

The controller is the driver of a Ray job and expects ``ray.init`` to have
been called (``launcher.commands.run`` does it).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import ray

from launcher.runtime import identity, resources, rundir
from launcher.runtime.lock import RunLock
from launcher.runtime.watchdog import Watchdog, WatchdogPolicy
from launcher.estimate.memory import cpu_state_bytes, model_shape, startup_host_bytes
from launcher.recipe import Recipe
from launcher.runtime.resources import ClusterView, ResourcesUnavailable
from launcher.runtime.workers import PlacementFailed, WorkerFailure, WorkerGroup, read_on_nodes
from topology.files import dump_text
from topology.network.model import Topology
from topology.planning.plan import Plan
from topology.calibration import load_calibration
from topology.cost import HardwareRates
from topology.planning.planner import make_plan
from topology.profiling.profile import ProfileError, profile_cluster
from trainer import storage
from trainer.checkpoint import latest_step
from trainer.config import DataConfig, StageConfig
from trainer.reporting.progress import StageProgress, format_seconds
from trainer.reporting.ranklog import rank_log_path

log = logging.getLogger("ringleader")


class StageFailed(RuntimeError):
    """A stage could not finish within its retries."""


def default_profile_cache() -> Path:
    """Profiles are keyed by Ray node ids, unique to one cluster's lifetime, so a per-user cache is safe."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ringleader" / "profiles"


@dataclass
class ControllerOptions:
    """How the controller runs, apart from the recipe."""

    run_dir: str | Path
    """A path every host mounts, or an object store URI (s3://, gs://, ...)."""
    reprofile: bool = False
    """Measure the network again at the start even if a profile of these nodes is cached."""
    profile_cache: Path | None = None
    """Where measured profiles are kept (default: ~/.cache/ringleader/profiles)."""
    resource_timeout_s: float = 600.0
    """How long to wait for the autoscaler (or a replacement host) to provide a stage's GPUs."""
    placement_timeout_s: float = 120.0
    """How long the placement group and the rank actors may take to come up."""
    restart_from: str | None = None
    """Redo this stage and every stage after it, even if the run directory holds them (see ``identity``)."""
    watchdog: WatchdogPolicy = field(default_factory=WatchdogPolicy)
    """How long a stage may go without a step before the attempt is torn down and retried."""
    profile_timeout_s: float = 300.0
    profile_transfer_mb: float = 64.0
    """Size of each timed message between two hosts, MiB."""
    profile_repeats: int = 5
    strategy: str = "aware"
    """Planner strategy: ``aware``, ``naive`` or ``random``."""
    calibration: Path | None = None
    """Calibration file of achieved rates for the cost model (default: published figures for the GPU)."""
    progress_bar: bool | None = None
    """tqdm bar (True), plain lines (False), or a bar only on a terminal (None)."""
    token_store: str | Path | None = None
    """Root of prepared token stores, a path or a URI (default: ``tokens/`` beside the run directory, shared by runs)."""
    verbose: bool = False
    """Ranks' own output (DeepSpeed, warnings) on the console too, not only in their rank logs."""


class Controller:
    """Runs every stage of ``recipe`` on the connected Ray cluster."""

    def __init__(self, recipe: Recipe, options: ControllerOptions):
        self.recipe, self.opt = recipe, options
        self.run_dir = rundir.RunDir(storage.normalize(options.run_dir))
        self._reprofile = options.reprofile
        self.can_grow = False
        self.use_gpus = False
        self._nodes: list[str] = []
        """Ray node ids the current attempt depends on: all while profiling, then its ranks'."""
        self._measured: dict[str, Any] = {}

    def run_all(self) -> list[dict[str, Any]]:
        """Run the stages in order; returns each stage's result (``StageResult`` as a dict)."""
        configs = self.recipe.stage_configs(self.run_dir.root)
        self.can_grow = resources.autoscaling()
        view = ClusterView.snapshot()
        self.use_gpus = view.use_gpus or self.can_grow
        view = replace(view, use_gpus=self.use_gpus)
        resources.check_capacity([(c.name, c.gpus) for c in configs], view, self.can_grow)
        resources.check_host_memory([(c.name, c.gpus, host_need(c, self.use_gpus)) for c in configs], view, self.can_grow)
        identity.stages_to_redo(configs, self.opt.restart_from)  # a changed recipe is refused before the lock is taken
        ctx = ray.get_runtime_context()
        lock = RunLock.acquire(self.run_dir.root, ctx.get_job_id(), ctx.gcs_address)
        results = []
        try:
            ids = self._claim(configs)
            log.info("cluster: %d node(s), %d %ss%s; run directory %s", len(view.nodes), view.total, view.unit,
                     ", autoscaling" if self.can_grow else "", self.run_dir.root)
            for i, cfg in enumerate(configs):
                done = rundir.finished(cfg.output_dir)
                if done is not None:
                    log.info("stage %s: already finished in this run directory (%s); skipping", cfg.name, cfg.output_dir)
                    results.append(done)
                    continue
                identity.record(cfg.output_dir, ids[i])
                # Every node must see the run directory before the cluster writes a token store beside it.
                alive = [n.node_id for n in ClusterView.snapshot().nodes]
                rundir.check_shared(self.run_dir.root, lambda loc: read_on_nodes(loc, alive))
                cfg = replace(cfg, data=self._prepared(cfg))
                results.append(self.run_stage(cfg, self.recipe.stages[i].min_gpus))
        finally:
            if self.can_grow:
                resources.release_request()
            lock.release()
        return results

    def _claim(self, configs: list[StageConfig]) -> list[identity.Identity]:
        """Under the lock: check the recipe against the run directory again, clear the stages to redo, copy the recipe in."""
        redo = identity.stages_to_redo(configs, self.opt.restart_from)
        aside = identity.move_aside(self.run_dir.root, [configs[i].output_dir for i in redo])
        if aside is not None:
            log.info("restarting from stage %s: earlier output of %s moved to %s", self.opt.restart_from,
                     ", ".join(configs[i].name for i in redo), aside)
        self.run_dir = rundir.RunDir.create(self.run_dir.root, self.recipe.source)
        return identity.identities(configs)

    def where(self) -> list[str]:
        """Where a run's files are, stage by stage: the lines that end ``ringleader run``."""
        return rundir.layout(self.run_dir.root, [c.output_dir for c in self.recipe.stage_configs(self.run_dir.root)])

    # ------------------------------------------------------------------ stage
    def run_stage(self, cfg: StageConfig, min_gpus: int | None = None) -> dict[str, Any]:
        """One stage with bounded retries; raises ``StageFailed`` when they run out."""
        attempt, retry = 0, None
        while True:
            try:
                result = self._attempt(cfg, min_gpus, attempt, retry)
                rundir.mark_done(cfg.output_dir, result)
                log.info("stage %s: done, final loss %.4f, %d tokens, model in %s", cfg.name, result["final_loss"],
                         result["tokens"], result["hf_dir"])
                return result
            except (WorkerFailure, PlacementFailed, ProfileError) as exc:
                attempt += 1
                lost = self._settle()
                resume = latest_step(cfg.output_dir)
                event = {"event": "retry", "stage": cfg.name, "attempt": attempt, "max_retries": self.recipe.max_retries,
                         "cause": str(exc), "lost_nodes": lost, "resume_step": resume}
                if attempt > self.recipe.max_retries:
                    rundir.append_event(cfg.output_dir, event)
                    raise StageFailed(f"stage {cfg.name!r} failed after {attempt} attempt(s): {exc}") from None
                retry = event  # recorded by the next attempt once it knows its world size
                log.warning("stage %s: attempt %d failed (%s); %s; retry %d/%d from %s%s", cfg.name, attempt, exc,
                            f"lost node(s) {', '.join(n[:12] for n in lost)}" if lost else "no host lost",
                            attempt, self.recipe.max_retries, f"checkpoint step {resume}" if resume else "the start",
                            f"; its log: {rank_log_path(cfg.output_dir, exc.rank)}" if isinstance(exc, WorkerFailure) else "")
            except ResourcesUnavailable as exc:
                if retry is not None and not retry.get("recorded"):
                    rundir.append_event(cfg.output_dir, dict(retry, world_size=None))
                raise StageFailed(f"stage {cfg.name!r}: {exc}") from None

    def _attempt(self, cfg: StageConfig, min_gpus: int | None, attempt: int, retry: dict[str, Any] | None = None) -> dict[str, Any]:
        """One try at the stage; ``retry`` is the event of the failure before it, written here with the new world size."""
        floor = cfg.gpus if attempt == 0 else (min_gpus or cfg.gpus)
        smallest = fit_gpus(cfg, cfg.gpus, floor, smallest=True)
        view = resources.ensure(cfg.gpus, self.use_gpus, self.opt.resource_timeout_s, self.can_grow,
                                at_least=smallest if attempt else None)
        gpus = fit_gpus(cfg, view.total, floor)
        if gpus is None:
            raise ResourcesUnavailable(f"{view.total} {view.unit}s left, stage needs {floor}+ in a shape that divides batch {cfg.batch}")
        if gpus != cfg.gpus:
            log.warning("stage %s: continuing on %d of %d %ss (min_gpus %s), batch %d kept, ring size %d -> %d",
                        cfg.name, gpus, cfg.gpus, view.unit, min_gpus, cfg.batch, cfg.cp, gpus // cfg.batch)
            cfg = replace(cfg, gpus=gpus)
        if retry is not None:
            rundir.append_event(cfg.output_dir, dict(retry, world_size=gpus, ring=gpus // cfg.batch))
            retry["recorded"] = True
        self._nodes = [n.node_id for n in view.nodes]  # the profiler visits every node
        topo = self._profile(view)
        plan = self._plan(cfg, topo)
        self._write_stage_files(cfg, topo, plan)
        self._nodes = placement_nodes(plan, topo)
        group = WorkerGroup.start(plan, self._nodes, view.bundle(), self.opt.placement_timeout_s, stage=cfg.name)
        try:
            rundir.check_shared(self.run_dir.root, group.read_on_hosts)
            group.init_process_group(cfg.collective_timeout)
            start = latest_step(cfg.output_dir) or 0
            predicted = (plan.cost or {}).get("step_time_s") if self.use_gpus else None  # predictions are for GPUs
            dog = Watchdog(self.opt.watchdog, cfg.steps, predicted)
            with StageProgress(cfg.name, cfg.steps, start, bar=self.opt.progress_bar) as progress:
                def on_metrics(metrics: dict[str, Any]) -> None:
                    progress.update(metrics)
                    dog.step(metrics)

                return group.run_stage(cfg.to_dict(), on_metrics, check=dog.check, verbose=self.opt.verbose)
        finally:
            group.shutdown()

    def _settle(self) -> list[str]:
        """After a failure: which of the attempt's nodes are gone (once Ray agrees)."""
        return resources.wait_for_dead(list(dict.fromkeys(self._nodes)), timeout_s=self.opt.resource_timeout_s)

    def _prepared(self, cfg: StageConfig) -> DataConfig:
        """The stage's data with its token store, tokenised on the cluster first if missing (before any rank starts)."""
        from trainer.data.prepare import STORE_DIR, ensure_prepared  # Ray Data: only once a stage runs

        root = self.opt.token_store or storage.join(storage.parent(self.run_dir.root), STORE_DIR)
        return ensure_prepared(cfg.data, cfg.model, root)

    # --------------------------------------------------------------- profile
    def _profile(self, view: ClusterView) -> Topology:
        """Measure (or reuse) the network of the alive nodes; GPU counts become rank slots."""
        cache = self.opt.profile_cache or default_profile_cache()
        measured = profile_cluster(transfer_mb=self.opt.profile_transfer_mb, repeats=self.opt.profile_repeats,
                                   cache_dir=cache, reprofile=self._reprofile, timeout_s=self.opt.profile_timeout_s)
        self._reprofile = False  # forced once per run; later stages reuse it while the nodes stay the same
        self._measured = with_slots(measured, view)
        return Topology.from_measured(self._measured, source="profile")

    def _plan(self, cfg: StageConfig, topo: Topology) -> Plan:
        hosts = [h for h in topo.hosts if topo.gpus(h)]
        shape, _ = model_shape(cfg.model)
        rates = HardwareRates.from_calibration(load_calibration(self.opt.calibration, topo.gpu))
        plan = make_plan(topo, cfg.gpus, cfg.cp, cfg.ulysses, cfg.seq_len, strategy=self.opt.strategy, hosts=hosts, model=shape,
                         rates=rates)
        log.info("stage %s: %s", cfg.name, plan_summary(plan, topo.gpu.name if self.use_gpus else None))
        return plan

    def _write_stage_files(self, cfg: StageConfig, topo: Topology, plan: Plan) -> None:
        d = cfg.output_dir
        storage.write_bytes(storage.join(d, rundir.TOPOLOGY_JSON), dump_text(self._measured, "topology.json"))
        storage.write_bytes(storage.join(d, rundir.PLAN_JSON), dump_text(plan.to_dict(), rundir.PLAN_JSON))
        storage.write_bytes(storage.join(d, rundir.STAGE_JSON), json.dumps(cfg.to_dict(), indent=1) + "\n")
        from topology.viz.page import render_html  # matplotlib: imported once a stage is planned, not at start-up

        storage.write_bytes(storage.join(d, rundir.TOPOLOGY_HTML), render_html(topo, plan, on_gpus=self.use_gpus))  # CPU slots: no GPU predictions


# ------------------------------------------------------------------ helpers
def host_need(cfg: StageConfig, use_gpus: bool) -> Callable[[int], float]:
    """Bytes one host needs with ``n`` of the stage's ranks on it: while they build the model (``startup_host_bytes``),
    and on CPU slots, where the training state lives in the host's memory too, while they train (``cpu_state_bytes``)."""
    from trainer.engine import zero_stage

    shape, _ = model_shape(cfg.model)
    stage = zero_stage(cfg.deepspeed)
    if use_gpus:
        return lambda n: startup_host_bytes(shape.params, n, cfg.gpus, stage == 3)
    return lambda n: max(startup_host_bytes(shape.params, n, cfg.gpus, stage == 3), cpu_state_bytes(shape.params, n, cfg.gpus, stage))


def fit_gpus(cfg: StageConfig, available: int, floor: int, smallest: bool = False) -> int | None:
    """Most (or, with ``smallest``, fewest) GPUs in [floor, min(cfg.gpus, available)] the stage can run on.

    Batch (rings) is kept so every optimizer step sees the same tokens; the
    ring shrinks, so it must still divide into Ulysses groups and zigzag chunks.
    """
    candidates = range(floor, min(cfg.gpus, available) + 1)
    ok = [g for g in candidates if g % cfg.batch == 0 and (g // cfg.batch) % cfg.ulysses == 0
          and cfg.seq_len % (2 * (g // cfg.batch)) == 0]
    if not ok:
        return None
    return ok[0] if smallest else ok[-1]


def with_slots(measured: dict[str, Any], view: ClusterView) -> dict[str, Any]:
    """The profile with each host's ``gpus`` set to the ranks its node can hold now.

    On a cluster without GPUs a rank takes a CPU, so the planner sees CPU
    slots as devices; nodes with no slot (a CPU-only head) keep none.
    """
    slots = view.slots
    out = dict(measured)
    out["hosts"] = [dict(h, gpus=slots.get(h.get("node_id"), 0)) for h in measured["hosts"]]
    return out


def placement_nodes(plan: Plan, topo: Topology) -> list[str]:
    """Ray node id of each rank's host."""
    return [p.node_id or topo.graph.nodes[p.host]["node_id"] for p in plan.placements]


def plan_summary(plan: Plan, gpu: str | None = "L40S") -> str:
    """One line: shape, hosts with their ranks, predicted step time (for ``gpu``s; none on CPU slots)."""
    hosts = []
    for h in plan.hosts:
        ranks = plan.ranks_on(h)
        hosts.append(f"{h} r{ranks[0]}" + (f"-{ranks[-1]}" if len(ranks) > 1 else ""))
    c = plan.cost
    cost = "; ranks on CPU slots (no GPU step prediction)" if gpu is None else ""
    if c and gpu is not None:
        hop = c.get("slowest_hop_gbps")
        t = c["step_time_s"]
        shown = format_seconds(t) if t >= 1 else f"{t * 1e3:.2f} ms" if t >= 1e-3 else f"{t * 1e6:.1f} us"
        cost = (f"; predicted step on {gpu} {shown} ({c.get('tokens_per_s', 0):,.0f} tokens/s"
                + (f", slowest ring hop {hop:.1f} GB/s" if hop else "")
                + (", ring comm hidden" if c.get("hidden") else ", ring comm exposed") + ")")
    return (f"plan {plan.strategy}: {plan.world_size} ranks = dp {plan.dp} x ring {plan.ring} x ulysses {plan.ulysses} "
            f"on {len(plan.hosts)} host(s) [{', '.join(hosts)}]{cost}")
