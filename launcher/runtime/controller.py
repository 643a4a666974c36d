"""The stage loop: a recipe's stages, one after another, on a Ray cluster.

For each stage::

    resources -> profile -> plan -> placement group + one actor per rank -> train -> next stage

and, when a worker or host dies mid-stage: tear the group down, wait until
Ray agrees which hosts are gone, re-profile the hosts that remain, re-plan
(on fewer GPUs if the stage's ``min_gpus`` allows, else after waiting for a
replacement), and start again; the trainer resumes from the stage's newest
DeepSpeed checkpoint. Retries are bounded by ``recipe.max_retries`` and each
is logged with its cause and recorded in the stage's metrics.jsonl.

The controller is the driver of a Ray job and expects ``ray.init`` to have
been called (``launcher.commands.run`` does it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from launcher.runtime import resources, rundir
from launcher.estimate.memory import model_shape
from launcher.runtime.progress import StageProgress, format_seconds
from launcher.recipe import Recipe
from launcher.runtime.resources import ClusterView, ResourcesUnavailable
from launcher.runtime.workers import PlacementFailed, WorkerFailure, WorkerGroup
from topology.model import Topology, dump_text, write_atomic
from topology.plan import Plan
from topology.calibration import load_calibration
from topology.cost import HardwareRates
from topology.planner import make_plan
from topology.profile import ProfileError, profile_cluster
from trainer.checkpoint import latest_step
from trainer.config import StageConfig

log = logging.getLogger("ringleader")


class StageFailed(RuntimeError):
    """A stage could not finish within its retries."""


def default_profile_cache() -> Path:
    """Profiles are keyed by Ray node ids, unique to one cluster's lifetime, so a per-user cache is safe."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ringleader" / "profiles"


@dataclass
class ControllerOptions:
    """How the controller runs, apart from the recipe."""

    run_dir: Path
    reprofile: bool = False
    """Measure the network again at the start even if a profile of these nodes is cached."""
    profile_cache: Path | None = None
    """Where measured profiles are kept (default: ~/.cache/ringleader/profiles)."""
    resource_timeout_s: float = 600.0
    """How long to wait for the autoscaler (or a replacement host) to provide a stage's GPUs."""
    placement_timeout_s: float = 120.0
    """How long the placement group and the rank actors may take to come up."""
    group_timeout_s: float = 1800.0
    """torch.distributed timeout: rendezvous and every collective (torchrun's default; a ZeRO-3
    checkpoint of a large model takes minutes). A dead rank is noticed through Ray long before."""
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


class Controller:
    """Runs every stage of ``recipe`` on the connected Ray cluster."""

    def __init__(self, recipe: Recipe, options: ControllerOptions):
        self.recipe, self.opt = recipe, options
        self.run_dir = rundir.RunDir(Path(options.run_dir).resolve())
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
        self.run_dir = rundir.RunDir.create(self.run_dir.root, self.recipe.source)
        log.info("cluster: %d node(s), %d %ss%s; run directory %s", len(view.nodes), view.total, view.unit,
                 ", autoscaling" if self.can_grow else "", self.run_dir.root)
        results = []
        try:
            for i, cfg in enumerate(configs):
                done = rundir.finished(cfg.output_dir)
                if done is not None:
                    log.info("stage %s: already finished in this run directory (%s); skipping", cfg.name, cfg.output_dir)
                    results.append(done)
                    continue
                results.append(self.run_stage(cfg, self.recipe.stages[i].min_gpus))
        finally:
            if self.can_grow:
                resources.release_request()
        return results

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
                log.warning("stage %s: attempt %d failed (%s); %s; retry %d/%d from %s", cfg.name, attempt, exc,
                            f"lost node(s) {', '.join(n[:12] for n in lost)}" if lost else "no host lost",
                            attempt, self.recipe.max_retries, f"checkpoint step {resume}" if resume else "the start")
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
        group = WorkerGroup.start(plan, self._nodes, view.bundle(), self.opt.placement_timeout_s)
        try:
            group.init_process_group(self.opt.group_timeout_s)
            start = latest_step(cfg.output_dir) or 0
            with StageProgress(cfg.name, cfg.steps, start, bar=self.opt.progress_bar) as progress:
                return group.run_stage(cfg.to_dict(), progress.update)
        finally:
            group.shutdown()

    def _settle(self) -> list[str]:
        """After a failure: which of the attempt's nodes are gone (once Ray agrees)."""
        return resources.wait_for_dead(list(dict.fromkeys(self._nodes)), timeout_s=self.opt.resource_timeout_s)

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
        d = Path(cfg.output_dir)
        write_atomic(d / rundir.TOPOLOGY_JSON, dump_text(self._measured, "topology.json"))
        plan.save(d / rundir.PLAN_JSON)
        cfg.save(d / rundir.STAGE_JSON)
        from topology.viz import render_html  # matplotlib: imported once a stage is planned, not at start-up

        write_atomic(d / rundir.TOPOLOGY_HTML, render_html(topo, plan))


# ------------------------------------------------------------------ helpers
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
