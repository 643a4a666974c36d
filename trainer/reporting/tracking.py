"""Experiment tracking: a stage's metrics in TensorBoard, Weights & Biases, MLflow and Ray's metrics.

A recipe's ``tracking:`` block chooses where the figures go::

    tracking:
      tensorboard: true                               # default: event files in <stage dir>/tensorboard
      wandb: {project: long-context, mode: offline}   # W&B through its own library (offline: `wandb sync` later)
      mlflow: {tracking_uri: file:/shared/mlruns}     # MLflow through its own client
      ray_metrics: true                               # default: Gauges in Ray's metrics (dashboard, Prometheus)

Rank 0 writes TensorBoard, W&B and MLflow (one run per stage, grouped by the
run directory); every rank inside a Ray worker sets Ray gauges tagged with
its stage and rank, so the dashboard and Prometheus hold every rank's step
time, ring communication wait and peak memory. Per step they get the
metrics of ``trainer.reporting.progress.StepReporter``; per stage the plan's figures
and the needle-in-a-haystack score.

``tensorboard --logdir RUN_DIR`` shows every stage of a run side by side.
A tracker whose library is missing is left out with one warning when it is
on by default (TensorBoard) and refused at recipe load when it was asked for.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from topology.errors import ConfigError

log = logging.getLogger("trainer.stage")

TENSORBOARD_DIR = "tensorboard"
"""Event files of a stage, in its output_dir."""

STEP_KEYS = ("loss", "lr", "tokens", "tokens_per_s", "step_time_s", "step_time_max_s", "step_time_min_s",
             "predicted_step_time_s", "ring_comm_s", "ring_comm_max_s", "peak_memory_gib", "peak_memory_max_gib")
"""Numbers of a step's metrics dict that trackers plot (the rest say which step it is)."""

PLAN_KEYS = ("world_size", "dp", "ring", "ulysses", "seq_len", "inter_host_hops", "cross_switch_hops", "slowest_hop_gbps")
"""Figures of a plan that hold on any device: its shape and the network under its rings."""

PREDICTION_KEYS = ("step_time_s", "tokens_per_s", "mfu", "ring_step_fwd_s", "attention_s", "dp_allreduce_s", "bound_step_s")
"""The plan's predictions, made for the topology's GPU model: reported only when ranks run on GPUs."""


@dataclass
class WandbConfig:
    """A Weights & Biases run per stage (``wandb.init``), grouped by run directory."""

    project: str | None = None
    """W&B project (default: the recipe's name)."""
    entity: str | None = None
    mode: str = "online"
    """``online``, ``offline`` (files under the run directory, ``wandb sync`` uploads them) or ``disabled``."""
    dir: str | None = None
    """Where W&B keeps its files (default: the run directory)."""

    def __post_init__(self) -> None:
        if self.mode not in ("online", "offline", "disabled"):
            raise ConfigError(f"tracking.wandb.mode is {self.mode!r}; use online, offline or disabled")


@dataclass
class MlflowConfig:
    """An MLflow run per stage, through ``mlflow.MlflowClient``."""

    tracking_uri: str | None = None
    """Tracking server or store, e.g. ``http://mlflow:5000`` or ``file:/shared/mlruns``
    (default: MLflow's own, from MLFLOW_TRACKING_URI). MLflow 3 opens ``file:`` stores
    only with MLFLOW_ALLOW_FILE_STORE=true in the ranks' environment."""
    experiment: str | None = None
    """Experiment name (default: the recipe's name)."""


@dataclass
class TrackingConfig:
    """Where a run's metrics go besides metrics.jsonl."""

    tensorboard: bool = True
    """TensorBoard event files in each stage directory's ``tensorboard/``."""
    wandb: WandbConfig | None = None
    mlflow: MlflowConfig | None = None
    ray_metrics: bool = True
    """Ray gauges (``ray.util.metrics``) from every rank, when ranks run as Ray workers."""

    def __post_init__(self) -> None:
        if isinstance(self.wandb, dict):
            self.wandb = WandbConfig(**self.wandb)
        if isinstance(self.mlflow, dict):
            self.mlflow = MlflowConfig(**self.mlflow)

    @classmethod
    def from_dict(cls, raw: Any, where: str = "tracking", name: str | None = None) -> "TrackingConfig":
        """Validate a recipe's ``tracking:`` block; ``name`` (the recipe's) fills project and experiment."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping with keys {', '.join(f.name for f in fields(cls))}")
        _known(raw, cls, where)
        out = dict(raw)
        for key, sub, package in (("wandb", WandbConfig, "wandb"), ("mlflow", MlflowConfig, "mlflow")):
            value = out.get(key)
            if value in (None, False):
                out[key] = None
                continue
            value = {} if value is True else value
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key}: expected true or a mapping with keys {', '.join(f.name for f in fields(sub))}")
            _known(value, sub, f"{where}.{key}")
            if importlib.util.find_spec(package) is None:
                raise ConfigError(f"{where}.{key}: the {package} package is not installed; "
                                  f"pip install {package} (or ringleader[tracking]) or remove {key} from the recipe")
            out[key] = sub(**value)
        for key in ("tensorboard", "ray_metrics"):
            if not isinstance(out.get(key, True), bool):
                raise ConfigError(f"{where}.{key} is {out[key]!r}; use true or false")
        cfg = cls(**out)
        if name and cfg.wandb is not None and cfg.wandb.project is None:
            cfg.wandb.project = name
        if name and cfg.mlflow is not None and cfg.mlflow.experiment is None:
            cfg.mlflow.experiment = name
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _known(raw: dict[str, Any], cls: type, where: str) -> None:
    unknown = sorted(set(raw) - {f.name for f in fields(cls)})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys are {', '.join(f.name for f in fields(cls))}")


def plan_figures(plan: Any, predictions: bool) -> dict[str, float]:
    """The plan's numbers for a stage summary: shape and network always, GPU predictions only if ``predictions``."""
    figures = {"world_size": plan.world_size, "dp": plan.dp, "ring": plan.ring, "ulysses": plan.ulysses, "seq_len": plan.seq_len}
    cost = plan.cost or {}
    keys = PLAN_KEYS + (PREDICTION_KEYS if predictions else ())
    figures.update({k: cost[k] for k in keys if isinstance(cost.get(k), (int, float)) and not isinstance(cost.get(k), bool)})
    return {k: float(v) for k, v in figures.items()}


def _numbers(m: dict[str, Any], keys: tuple[str, ...] | None = None) -> dict[str, float]:
    return {k: float(v) for k, v in m.items() if (keys is None or k in keys)
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


# ------------------------------------------------------------------ sinks
class _TensorBoard:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def step(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"train/{k}", v, step)

    def stage(self, step: int, prefix: str, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, cfg: WandbConfig, name: str, group: str, run_dir: Path, config: dict[str, Any]):
        import wandb

        directory = Path(cfg.dir or run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        # console="off": W&B would otherwise wrap stdout/stderr, which the rank log owns. No system
        # monitor or metadata scan: it samples while the ranks wait on rank 0 in their first collective.
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, x_disable_meta=True,
                                  x_save_requirements=False, disable_git=True, save_code=False)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(directory), name=name,
                              group=group, config=config, reinit="create_new", settings=settings)

    def step(self, step: int, values: dict[str, float]) -> None:
        self.run.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def stage(self, step: int, prefix: str, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.run.summary[f"{prefix}/{k}"] = v

    def close(self) -> None:
        self.run.finish()


class _Mlflow:
    def __init__(self, cfg: MlflowConfig, name: str, group: str, params: dict[str, Any]):
        from mlflow import MlflowClient

        # A client of its own: no process-wide "active run" for other code to trip over.
        self.client = MlflowClient(tracking_uri=cfg.tracking_uri)
        experiment = cfg.experiment or group
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=name, tags={"ringleader.run": group}).info.run_id
        self.client.log_batch(self.run_id, params=_params(params))

    def step(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def stage(self, step: int, prefix: str, values: dict[str, float]) -> None:
        self.step(step, {f"{prefix}/{k}": v for k, v in values.items()})

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _params(params: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, str(v)[:500]) for k, v in params.items()]


class _RayMetrics:
    """Gauges and a counter in Ray's metrics, one time series per (stage, rank)."""

    _made: dict[str, Any] = {}  # one metric object per name and process, as Ray expects

    def __init__(self, stage: str, rank: int):
        self.tags = {"stage": stage, "rank": str(rank)}

    @classmethod
    def _gauge(cls, name: str) -> Any:
        from ray.util.metrics import Gauge

        if name not in cls._made:
            cls._made[name] = Gauge(f"ringleader_{name}", description=f"ringleader {name.replace('_', ' ')}",
                                    tag_keys=("stage", "rank"))
        return cls._made[name]

    def step(self, step: int, values: dict[str, float]) -> None:
        from ray.util.metrics import Counter

        for k, v in values.items():
            self._gauge(k).set(v, tags=self.tags)
        if "steps_total" not in self._made:
            self._made["steps_total"] = Counter("ringleader_steps_total", description="optimizer steps run",
                                                tag_keys=("stage", "rank"))
        self._made["steps_total"].inc(1, tags=self.tags)

    def stage(self, step: int, prefix: str, values: dict[str, float]) -> None:
        for k, v in values.items():
            self._gauge(f"{prefix}_{k}").set(v, tags=self.tags)

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ the set
class Trackers:
    """The trackers of one stage on one rank; each failure to log is a warning, never a failed stage."""

    def __init__(self, sinks: list[Any]):
        self.sinks = sinks
        self.last_step = 0

    @property
    def names(self) -> list[str]:
        return [type(s).__name__.strip("_").lower() for s in self.sinks]

    def log_step(self, metrics: dict[str, Any]) -> None:
        self.last_step = metrics["step"]
        self._each("step", metrics["step"], _numbers(metrics, STEP_KEYS))

    def log_stage(self, step: int, figures: dict[str, float]) -> None:
        """The plan's figures at the stage's start (``plan/<figure>``)."""
        self._each("stage", step, "plan", figures)

    def log_event(self, event: dict[str, Any]) -> None:
        """A stage-end event, e.g. ``{"event": "niah", "average": 0.8, ...}``: its numbers under its name."""
        values = {k: v for k, v in _numbers(event).items() if k not in ("time", "rank")}
        self._each("stage", self.last_step, event["event"], values)

    def close(self) -> None:
        self._each("close")
        self.sinks = []

    def _each(self, method: str, *args: Any) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a tracker outage must not stop training
                log.warning("tracking: %s.%s failed (%s: %s); leaving it out", type(sink).__name__.strip("_"), method,
                            type(exc).__name__, exc)
                self.sinks.remove(sink)


def open_trackers(cfg: TrackingConfig, stage: str, output_dir: str | Path, rank: int,
                  params: dict[str, Any] | None = None) -> Trackers:
    """The trackers this rank writes to for one stage (rank 0: all; other ranks: Ray metrics only).

    Parameters
    ----------
    cfg : the recipe's tracking block.
    stage : the stage's name; runs are named ``<run dir name>/<stage>`` and grouped by run directory.
    output_dir : the stage directory (its parent is the run directory).
    params : the stage's settings, recorded as the W&B config and MLflow params.
    """
    out = Path(output_dir)
    group = out.resolve().parent.name or "ringleader"
    name = f"{group}/{stage}"
    sinks: list[Any] = []
    if rank == 0:
        if cfg.tensorboard:
            if importlib.util.find_spec("tensorboard") is None:
                log.warning("tracking: the tensorboard package is not installed, so no event files "
                            "(pip install tensorboard, or tracking: {tensorboard: false})")
            else:
                sinks.append(_try(_TensorBoard, out / TENSORBOARD_DIR))
        if cfg.wandb is not None and cfg.wandb.mode != "disabled":
            sinks.append(_try(_Wandb, cfg.wandb, name, group, out.resolve().parent, dict(params or {})))
        if cfg.mlflow is not None:
            sinks.append(_try(_Mlflow, cfg.mlflow, name, group, dict(params or {})))
    if cfg.ray_metrics and _in_ray_worker():
        sinks.append(_RayMetrics(stage, rank))
    return Trackers([s for s in sinks if s is not None])


def _try(make: Any, *args: Any) -> Any:
    try:
        return make(*args)
    except Exception as exc:  # noqa: BLE001 - an unreachable tracker leaves the stage running without it
        log.warning("tracking: %s could not start (%s: %s); the stage runs without it", make.__name__.strip("_"),
                    type(exc).__name__, exc)
        return None


def _in_ray_worker() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()

