"""``ringleader calibrate``: measure the cost model's achieved rates on a cluster, or fit them from a finished run.

    ringleader calibrate -o calibration.json                       # RAY_ADDRESS, else an embedded local Ray
    ringleader calibrate --address 10.0.0.1:6379 --recipe clusters/recipes/llama3-8b-4194k.yaml --stage 4191K -o cal.json
    ringleader calibrate --from-run runs/demo-20261201-120000 -o cal.json

Live: one Ray actor per rank slot (a GPU, or ``--ranks`` CPU slots when the
cluster has no GPUs), ordered by host, joins one torch.distributed group
(NCCL on GPUs, gloo on CPUs) and measures, every rank at once
(``launcher.estimate.measure``): the recipe model's dense work (the model
without attention when it is small, GEMMs at its shapes otherwise), the
ring attention block kernel forward and backward at the stage's tokens per
rank (full and causal blocks), every ring hop sending at once, the latency
of one ring exchange and one all-to-all, all-reduce / reduce-scatter bus
bandwidth, and a DeepSpeed step of the model. The result is a
calibration file (``topology.calibration``) for ``plan``, ``run --dry-run``
and ``run`` (``--calibration FILE``).

``--from-run`` fits one from a run directory's stages (``launcher.estimate.fit``).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from launcher.commands.options import add_cluster_arguments
from topology.errors import ConfigError
from topology.files import check_writable

log = logging.getLogger("ringleader")

DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "clusters" / "recipes" / "demo.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="calibration file to write (JSON)")
    add_cluster_arguments(parser)
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="recipe whose model and stage set the shapes (default: demo)")
    parser.add_argument("--stage", help="stage whose tokens per rank set the block size (default: the recipe's last)")
    parser.add_argument("--ranks", type=int, default=None, metavar="N",
                        help="ranks on a cluster without GPUs (default: the stage's gpus, at most the CPUs)")
    parser.add_argument("--repeats", type=int, default=5, metavar="N", help="timed repeats of each measurement (default: %(default)s)")
    parser.add_argument("--from-run", metavar="RUN_DIR", help="fit the figures from a finished run's stages instead of measuring")
    parser.add_argument("--calibration", metavar="FILE", help="with --from-run: start from this calibration (default: the device's defaults)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    check_writable(out)
    if args.repeats < 1 or (args.ranks is not None and args.ranks < 1):
        raise ConfigError(f"--repeats ({args.repeats}) and --ranks ({args.ranks}) must be at least 1")
    if args.from_run:
        from launcher.estimate.fit import fit_run

        cal = fit_run(Path(args.from_run), args.calibration)
    else:
        cal = calibrate_live(args)
    cal.save(out)
    print(summary(cal))
    print(f"wrote {out}")
    return 0


def summary(cal: Any) -> str:
    lines = [f"calibration: {cal.source} ({cal.device})"]
    for name in cal.FIGURES:
        f = getattr(cal, name)
        if f is not None:
            lines.append(f"  {name:<20} {f.value:10.4g}   range {f.low:.4g} to {f.high:.4g}")
    return "\n".join(lines)


def shapes(recipe_path: str, stage_name: str | None) -> tuple[Any, Any, int, dict[str, Any]]:
    """(model shape, stage, tokens per rank, model config as a dict) from a recipe."""
    from launcher.estimate.memory import model_shape
    from launcher.recipe import Recipe

    recipe = Recipe.load(recipe_path, check_paths=False)
    stages = {s.name: s for s in recipe.stages}
    if stage_name is not None and stage_name not in stages:
        raise ConfigError(f"--stage {stage_name!r} is not a stage of {recipe_path}; stages: {', '.join(stages)}")
    stage = stages[stage_name] if stage_name else recipe.stages[-1]
    shape, _ = model_shape(recipe.model)
    cp = stage.gpus // stage.batch if isinstance(stage.batch, int) else stage.gpus
    return shape, stage, stage.seq_len // cp, asdict(recipe.model)


def ulysses_of(stage: Any) -> int:
    """The stage's Ulysses degree (1 while it is still ``auto``)."""
    return stage.ulysses if isinstance(stage.ulysses, int) else 1


def calibrate_live(args: argparse.Namespace) -> Any:
    import ray

    from launcher.runtime.attach import attach

    shape, stage, tokens, model_cfg = shapes(args.recipe, args.stage)
    target = args.address or os.environ.get("RAY_ADDRESS")
    started = not ray.is_initialized()
    if started:
        import launcher
        import topology
        import trainer

        log.info("%s", attach(args.address, [launcher, topology, trainer],
                              num_cpus=max(os.cpu_count() or 1, args.ranks or stage.gpus), num_gpus=0, verbose=args.verbose))
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        ranks = gpus if gpus else (args.ranks or stage.gpus)
        cluster = "local Ray" if not target else target
        return measure_on_ray(shape, tokens, ranks, use_gpus=bool(gpus), repeats=args.repeats, cluster=cluster, model_cfg=model_cfg,
                              ulysses=ulysses_of(stage))
    finally:
        if started:
            ray.shutdown()


def measure_on_ray(shape: Any, tokens: int, ranks: int, use_gpus: bool, repeats: int, cluster: str,
                   model_cfg: dict[str, Any] | None = None, timeout_s: float = 600.0, ulysses: int = 1) -> Any:
    """Start ``ranks`` actors, join them in one group ordered by host, measure, and build a Calibration."""
    import ray

    from topology.profiling.profile import _get

    opts = {"num_gpus": 1, "num_cpus": 0} if use_gpus else {"num_cpus": 1}
    actors = [rank_actor().options(**opts).remote() for _ in range(ranks)]
    try:
        infos = _get([a.info.remote() for a in actors], timeout_s, "starting the calibration ranks")
        order = sorted(range(ranks), key=lambda i: (infos[i]["ip"], infos[i]["node_id"]))
        actors, infos = [actors[i] for i in order], [infos[i] for i in order]
        hosts = [i["node_id"] for i in infos]
        port = _get([actors[0].listen.remote()], timeout_s, "opening the rendezvous store")[0]
        backend = "nccl" if use_gpus else "gloo"
        _get([a.join.remote(r, (infos[0]["ip"], port), backend, ranks) for r, a in enumerate(actors)], timeout_s,
             "joining the calibration group")
        spec = {"tokens": tokens, "hidden": shape.hidden, "intermediate": getattr(shape, "intermediate", 4 * shape.hidden),
                "n_q": shape.n_q_heads, "n_kv": shape.n_kv_heads, "head_dim": shape.head_dim, "layers": shape.layers,
                "hosts": hosts, "repeats": repeats, "model": model_cfg, "params": shape.params, "ulysses": ulysses}
        results = _get([a.measure.remote(spec) for a in actors], timeout_s, "measuring")
        _get([a.leave.remote() for a in actors], timeout_s, "leaving the group")
    finally:
        for a in actors:
            ray.kill(a)
    device = infos[0]["device"]
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta = {"ranks": ranks, "hosts": len(set(hosts)), "tokens_per_rank": tokens, "model": shape.name, "backend": backend,
            "repeats": repeats, "params": shape.params, "ulysses": ulysses}
    return build(results, f"calibrated on {cluster} at {when}", device, meta)


def build(results: list[dict[str, Any]], source: str, device: str, meta: dict[str, Any]) -> Any:
    """A Calibration from every rank's samples (``CalibrationRank.measure``)."""
    from launcher.estimate.measure import figure
    from topology.calibration import Calibration, Figure
    from topology.cost import HardwareRates

    def pooled(key: str) -> list[float]:
        return [v for r in results for v in r.get(key, [])]

    how = f"measured on {meta['ranks']} rank(s), all at once"
    one = Figure(1.0, 1.0, 1.0, "measured hop rates are used as caps instead")
    gemm = (figure(pooled("dense"), f"{how}: the model without attention, forward and backward through the loss, "
                                    f"at {meta['tokens_per_rank']} tokens, counted as 6 x params x tokens", "rate")
            or figure(pooled("gemm"), f"{how}: one layer's matmuls at {meta['tokens_per_rank']} tokens", "rate"))
    bus = figure(pooled("bus"), f"{how}: all-reduce and reduce-scatter of 16 MiB, bus bandwidth (NCCL tests' busbw)", "rate")
    # The DeepSpeed step also moves the ZeRO-3 traffic and computes 16 tokens; the model prices both on
    # their own (bus bandwidth, GEMM rate), so only what is left is the fixed cost of a step.
    ranks, params = meta["ranks"], meta.get("params", 0)
    priced = 6 * params * 16 / (gemm.value * 1e12) if gemm and params else 0.0
    if bus and params and ranks > 1:
        priced += 3 * params * (2 if device != "cpu" else 4) * (ranks - 1) / ranks / (bus.value * 1e9)
    host = HardwareRates(host_overlap=0.0 if device == "cpu" else 1.0)
    steps = [host.step_overhead_from(s, priced) for s in pooled("overhead")]
    return Calibration(
        source=source, device=device,
        gemm_tflops=gemm,
        attn_fwd_tflops=figure(pooled("attn_fwd"), f"{how}: ring attention block kernel forward", "rate"),
        attn_bwd_tflops=figure(pooled("attn_bwd"), f"{how}: ring attention block kernel backward", "rate"),
        attn_causal_fwd_tflops=figure(pooled("attn_causal_fwd"), f"{how}: causal (step 0) block kernel forward", "rate"),
        attn_causal_bwd_tflops=figure(pooled("attn_causal_bwd"), f"{how}: causal (step 0) block kernel backward", "rate"),
        network_efficiency=one,
        bus_efficiency=one,
        bus_gbps=bus,
        step_overhead_s=figure(steps, f"{how}: DeepSpeed ZeRO-3 step of the model on 16 tokens, "
                                      f"less its {priced * 1e3:.3g} ms of priced compute and ZeRO traffic", "seconds"),
        p2p_latency_s=figure(pooled("p2p_latency"), f"{how}: one ring exchange of 64 bytes, 50 in a row", "seconds"),
        a2a_latency_s=figure(pooled("a2a_latency"), f"{how}: one all-to-all of 64 bytes per peer, 50 in a row", "seconds"),
        inter_host_gbps=figure(pooled("inter"), f"{how}: every ring hop sending at once, host to host, "
                                          "bytes over time beyond a 64-byte hop's", "rate"),
        intra_host_gbps=figure(pooled("intra"), f"{how}: every ring hop sending at once, inside a host, "
                                          "bytes over time beyond a 64-byte hop's", "rate"),
        overlap=figure(pooled("overlap"), f"{how}: block kernel and K/V transfer timed apart and together"),
        meta=meta,
    )


def measure_rank(spec: dict[str, Any], device: Any) -> dict[str, list[float]]:
    """Everything one rank measures (all ranks call it at once); see ``launcher.estimate.measure``."""
    import torch
    import torch.distributed as dist

    from launcher.estimate import measure

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reps = spec["repeats"]
    out: dict[str, list[float]] = {}
    if spec.get("model") and 0 < spec.get("params", 0) <= measure.SMALL_MODEL:
        out["dense"] = measure.dense_tflops(spec["model"], spec["params"], spec["tokens"], device, dtype, reps)
    else:
        out["gemm"] = measure.gemm_tflops(spec["tokens"], spec["hidden"], spec["intermediate"], device, dtype, reps)
    # The block one ring step computes: after a Ulysses exchange over U ranks a rank holds U x its tokens of
    # 1/U of the heads (KV heads repeated when U exceeds them), as ``StepModel`` prices it.
    u = spec.get("ulysses", 1)
    block, n_q, n_kv = max(16, spec["tokens"] * u), max(1, spec["n_q"] // u), -(-spec["n_kv"] // u)
    out["attn_fwd"], out["attn_bwd"] = measure.attention_tflops(block, n_q, n_kv, spec["head_dim"], device, dtype, reps)
    out["attn_causal_fwd"], out["attn_causal_bwd"] = measure.attention_tflops(
        block, n_q, n_kv, spec["head_dim"], device, dtype, reps, causal=True)
    kv_bytes = 2 * block * n_kv * spec["head_dim"] * (2 if device.type == "cuda" else 4)
    out.update(measure.ring_hops(spec["hosts"], kv_bytes, reps, device))
    out["overlap"] = measure.overlap_fraction(block, n_q, n_kv, spec["head_dim"], kv_bytes, device, dtype, reps)
    if dist.get_world_size() > 1:
        out["p2p_latency"] = measure.exchange_seconds(64, reps, device)
        out["a2a_latency"] = measure.all_to_all_seconds(64 * dist.get_world_size(), reps, device)
    out["bus"] = measure.bus_gbps(16 * 2**20, reps, device)
    if spec.get("step_overhead", True):
        out["overhead"] = measure.step_overhead_s(spec["hidden"], spec["layers"], device, repeats=reps,
                                                  model_cfg=spec.get("model"), params=spec.get("params", 0))
    return out


@functools.cache
def rank_actor() -> Any:
    """The ``CalibrationRank`` Ray actor class, defined on first use so ``--help`` does not import Ray."""
    import ray

    @ray.remote
    class CalibrationRank:
        """One rank of the calibration group (a GPU, or a CPU slot)."""

        def __init__(self) -> None:
            import torch

            from topology.profiling import bandwidth

            self.ip = ray.util.get_node_ip_address()
            bandwidth.bind_to(self.ip)
            if not torch.cuda.is_available():
                torch.set_num_threads(1)  # one CPU slot per rank, as the stage's ranks run
            self.store = None
            self.device = None

        def info(self) -> dict[str, Any]:
            import torch

            cuda = torch.cuda.is_available() and bool(ray.get_gpu_ids())
            return {"ip": self.ip, "node_id": ray.get_runtime_context().get_node_id(),
                    "device": torch.cuda.get_device_name() if cuda else "cpu"}

        def listen(self) -> int:
            from topology.profiling import bandwidth

            self.store = bandwidth.serve_store(self.ip, 600.0)
            return self.store.port

        def join(self, rank: int, master: tuple[str, int], backend: str, world: int) -> None:
            from topology.profiling import bandwidth

            bandwidth.join_group(self.store if rank == 0 else tuple(master), rank, world, backend, 600.0)
            self.device = bandwidth.device_for(backend)

        def measure(self, spec: dict[str, Any]) -> dict[str, list[float]]:
            os.environ.setdefault("LOCAL_RANK", "0")
            return measure_rank(spec, self.device)

        def leave(self) -> None:
            from topology.profiling import bandwidth

            bandwidth.leave_group()

    return CalibrationRank
