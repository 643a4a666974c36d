"""A recipe: the model, the data and the ordered stages of progressive training.

Recipes are YAML files (clusters/recipes/). Loading one validates it as a
whole before anything starts; each error names the stage and field::

    name: demo
    model: {tiny: {hidden_size: 64, ...}, base_theta: 10000, base_len: 128, head_dim: 16}
    data: {path: ../data/corpus, kind: pretrain}
    deepspeed: {zero_optimization: {stage: 3}}     # DeepSpeed's keys, merged over the defaults
    stages:
      - {name: 256, seq_len: 256, rope_theta: {rule: ntk}, batch: 1, steps: 4, gpus: 2}
      - {name: 1k, seq_len: 1024, rope_theta: {rule: scaling-law}, batch: 1, steps: 4, gpus: 4}

``rope_theta`` is a number or a rule: ``{rule: ntk, alpha: 4, from: STAGE}``
(NTK-aware from the named stage, default the previous one, or the base model
for the first) or ``{rule: scaling-law}`` (critical-dimension law from the
base model's theta and length). ``batch`` and ``ulysses`` may be ``auto``:
the sizing step picks them for the cluster. ``ring: N`` may stand in for
``batch: gpus/N`` (``ring: auto`` = ``batch: auto``). Relative data and model paths
are relative to the recipe file.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from topology.errors import ConfigError
from topology.model import load_data
from trainer.config import DEFAULT_DEEPSPEED, DataConfig, ModelConfig, StageConfig
from trainer.rope import ntk_theta, scaling_law_theta

AUTO = "auto"


@dataclass
class ThetaRule:
    """How a stage's RoPE theta is chosen."""

    rule: str
    """``ntk`` or ``scaling-law``."""
    alpha: float = 4.0
    base_stage: str | None = None
    """For ``ntk``: the stage whose theta and length it scales from (default: the previous stage)."""


@dataclass
class RecipeStage:
    """One stage as written in the recipe; may hold rules and ``auto``."""

    name: str
    seq_len: int
    rope_theta: float | ThetaRule
    batch: int | str
    steps: int
    gpus: int
    grad_accum: int = 1
    lr: float = 2e-5
    ulysses: int | str = 1
    checkpoint_every: int = 0
    min_gpus: int | None = None
    """Fewest GPUs this stage may continue on after a host is lost (default: all of ``gpus``)."""
    data: DataConfig | None = None
    """Overrides the recipe's data for this stage (e.g. a chat stage)."""
    niah: dict[str, Any] | None = None
    """Run needle-in-a-haystack at the end of the stage with these settings."""
    published_tokens: int | None = None
    """Total tokens as published, checked by the dry run against seq_len x batch x accumulation x steps."""
    train_batch_size: int | None = None
    """Sequences per optimizer step (DeepSpeed's key) = batch x grad_accum. With ``batch: auto``
    the sizing keeps it and sets grad_accum; without it the written grad_accum stays."""


@dataclass
class Recipe:
    name: str
    model: ModelConfig
    data: DataConfig
    stages: list[RecipeStage]
    deepspeed: dict[str, Any] = field(default_factory=dict)
    run_dir: str = "runs"
    max_retries: int = 2
    """Restarts of one stage after a worker or host failure before the run gives up."""
    gpu_type: str = "L40S"
    seed: int = 0
    source: str = "recipe"

    @property
    def peak_gpus(self) -> int:
        return max(s.gpus for s in self.stages)

    def stage(self, name: str) -> RecipeStage:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"{self.source}: no stage named {name!r}; stages are {', '.join(s.name for s in self.stages)}")

    def resolve_theta(self) -> dict[str, float]:
        """Theta of every stage, rules applied in order."""
        thetas: dict[str, float] = {}
        lengths: dict[str, int] = {}
        prev_theta, prev_len = self.model.base_theta, self.model.base_len
        for s in self.stages:
            t = s.rope_theta
            if isinstance(t, ThetaRule) and t.rule == "ntk":
                base_t, base_l = (thetas[t.base_stage], lengths[t.base_stage]) if t.base_stage else (prev_theta, prev_len)
                if s.seq_len < base_l:  # the rule stretches context; below 1x it yields no real theta
                    raise ConfigError(f"{self.source}: stage {s.name!r}: rope_theta rule ntk scales up from {base_l} tokens, "
                                      f"but seq_len is {s.seq_len}; give a number or raise seq_len (model.base_len sets the start)")
                theta = ntk_theta(base_t, base_l, s.seq_len, self.model.head_dim, t.alpha)
            elif isinstance(t, ThetaRule):
                theta = scaling_law_theta(self.model.base_theta, self.model.base_len, s.seq_len)
            else:
                theta = float(t)
            thetas[s.name], lengths[s.name] = theta, s.seq_len
            prev_theta, prev_len = theta, s.seq_len
        return thetas

    def stage_configs(self, run_dir: str | os.PathLike) -> list[StageConfig]:
        """Resolved StageConfigs, each stage initialised from the previous one's HF model."""
        thetas = self.resolve_theta()
        out: list[StageConfig] = []
        deepspeed = _merge(copy.deepcopy(DEFAULT_DEEPSPEED), self.deepspeed)
        prev_hf: str | None = None
        for i, s in enumerate(self.stages):
            if AUTO in (s.batch, s.ulysses):
                raise ConfigError(f"{self.source}: stage {s.name!r}: batch/ulysses are 'auto'; size the recipe for a cluster first (ringleader run --dry-run shows the choice)")
            stage_dir = Path(run_dir) / f"stage{i}-{s.name}"
            cfg = StageConfig(
                name=s.name, seq_len=s.seq_len, rope_theta=thetas[s.name], batch=int(s.batch), steps=s.steps,
                gpus=s.gpus, model=self.model, data=s.data or self.data, output_dir=str(stage_dir),
                grad_accum=s.grad_accum, lr=s.lr, ulysses=int(s.ulysses), checkpoint_every=s.checkpoint_every,
                init_from=prev_hf, deepspeed=copy.deepcopy(deepspeed), seed=self.seed, niah=s.niah,
            )
            out.append(cfg)
            prev_hf = str(stage_dir / "hf")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, check_paths: bool = True) -> "Recipe":
        """Read and validate a recipe; ``check_paths=False`` (dry runs) skips the data-exists check,
        since data usually lives on the cluster's shared filesystem, not where the dry run is."""
        return cls.from_dict(load_data(path), base_dir=Path(path).resolve().parent, source=str(path), check_paths=check_paths)

    @classmethod
    def from_dict(cls, data: Any, base_dir: Path | None = None, source: str = "recipe", check_paths: bool = True) -> "Recipe":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level")
        base_dir = base_dir or Path.cwd()
        _no_unknown(data, {f.name for f in fields(cls)} - {"source"}, source)
        for key in ("name", "model", "data", "stages"):
            if key not in data:
                raise ConfigError(f"{source}: '{key}' is missing")
        model = _build(ModelConfig, data["model"], f"{source}: model")
        if model.path and not Path(model.path).is_absolute() and (base_dir / model.path).exists():
            model.path = str(base_dir / model.path)
        elif model.path and (model.path.startswith((".", "/")) and not Path(model.path).exists()):
            raise ConfigError(f"{source}: model.path {model.path!r} does not exist; give a local directory or a hub name")
        recipe_data = _data(data["data"], base_dir, f"{source}: data", check_paths)
        if not isinstance(data["stages"], list) or not data["stages"]:
            raise ConfigError(f"{source}: 'stages' must be a non-empty list")
        stages = [_stage(s, i, base_dir, source, check_paths) for i, s in enumerate(data["stages"])]
        recipe = cls(
            name=str(data["name"]), model=model, data=recipe_data, stages=stages,
            deepspeed=data.get("deepspeed") or {}, run_dir=str(data.get("run_dir", "runs")),
            max_retries=int(data.get("max_retries", 2)), gpu_type=str(data.get("gpu_type", "L40S")),
            seed=int(data.get("seed", 0)), source=source,
        )
        recipe._validate()
        return recipe

    def _validate(self) -> None:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"{self.source}: stage names must be unique, got {names}")
        seen: set[str] = set()
        for s in self.stages:
            t = s.rope_theta
            if isinstance(t, ThetaRule) and t.base_stage and t.base_stage not in seen:
                raise ConfigError(f"{self.source}: stage {s.name!r}: rope_theta.from names {t.base_stage!r}, which is not an earlier stage")
            seen.add(s.name)
        if any(AUTO in (s.batch, s.ulysses) for s in self.stages):
            self.resolve_theta()  # shapes are checked once sizing has filled in 'auto'
        else:
            self.stage_configs(self.run_dir)  # resolves theta; each StageConfig checks its own shape


def _stage(raw: Any, i: int, base_dir: Path, source: str, check_paths: bool = True) -> RecipeStage:
    where = f"{source}: stages[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    where = f"{source}: stage {raw.get('name', i)!r}"
    _no_unknown(raw, {f.name for f in fields(RecipeStage)} | {"ring"}, where)
    raw = dict(raw)
    raw.setdefault("name", str(i))
    raw["name"] = str(raw["name"])
    if "ring" in raw:  # ring size is the other face of batch: ring = gpus / batch
        raw["batch"] = _batch_from_ring(raw.pop("ring"), raw.get("batch"), raw.get("gpus"), where)
    for key in ("seq_len", "rope_theta", "batch", "steps", "gpus"):
        if key not in raw:
            raise ConfigError(f"{where}: '{key}' is missing")
    theta = raw["rope_theta"]
    if isinstance(theta, dict):
        theta = dict(theta)
        if "from" in theta:
            theta["base_stage"] = str(theta.pop("from"))
        rule = _build(ThetaRule, theta, f"{where}: rope_theta")
        if rule.rule not in ("ntk", "scaling-law"):
            raise ConfigError(f"{where}: rope_theta.rule is {rule.rule!r}; use 'ntk' or 'scaling-law' (or a number)")
        raw["rope_theta"] = rule
    elif not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ConfigError(f"{where}: rope_theta is {theta!r}; give a positive number or {{rule: ntk|scaling-law}}")
    for key in ("seq_len", "steps", "gpus", "grad_accum", "checkpoint_every", "batch", "ulysses", "min_gpus", "train_batch_size"):
        value = raw.get(key)
        if value is None or (key in ("batch", "ulysses") and value == AUTO):
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "checkpoint_every" else 1):
            raise ConfigError(f"{where}: {key} is {value!r}; it must be a whole number >= {0 if key == 'checkpoint_every' else 1}" + (" or 'auto'" if key in ("batch", "ulysses") else ""))
    if raw.get("data") is not None:
        raw["data"] = _data(raw["data"], base_dir, f"{where}: data", check_paths)
    if "lr" in raw:
        raw["lr"] = float(raw["lr"])
    if raw.get("niah") is not None:
        raw["niah"] = _niah(raw["niah"], base_dir, f"{where}: niah")
    stage = RecipeStage(**raw)
    if stage.min_gpus is not None and stage.min_gpus > stage.gpus:
        raise ConfigError(f"{where}: min_gpus ({stage.min_gpus}) exceeds gpus ({stage.gpus})")
    tbs = stage.train_batch_size
    if tbs is not None and stage.batch != AUTO and tbs != stage.batch * stage.grad_accum:
        raise ConfigError(f"{where}: train_batch_size ({tbs}) != batch ({stage.batch}) x grad_accum ({stage.grad_accum}); fix one or write batch: auto")
    return stage


def _batch_from_ring(ring: Any, batch: Any, gpus: Any, where: str) -> int | str:
    if batch is not None:
        raise ConfigError(f"{where}: give 'batch' or 'ring', not both (ring size = gpus / batch)")
    if ring == AUTO:
        return AUTO
    if not isinstance(ring, int) or isinstance(ring, bool) or ring < 1 or not isinstance(gpus, int) or gpus % ring:
        raise ConfigError(f"{where}: ring is {ring!r}; it must be 'auto' or a whole number that divides gpus ({gpus})")
    return gpus // ring


def _niah(raw: Any, base_dir: Path, where: str) -> dict[str, Any]:
    """Validate a stage's ``niah:`` now, so a typo fails before any rank trains."""
    from trainer.niah.evaluate import NiahConfig  # imports torch: only for recipes that ask for NIAH

    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of NiahConfig fields (max_len, min_len, ...)")
    return asdict(NiahConfig.from_dict(raw, source=where, base_dir=base_dir))


def _data(raw: Any, base_dir: Path, where: str, check_paths: bool = True) -> DataConfig:
    cfg = _build(DataConfig, raw, where)
    if cfg.path is None:  # a generated corpus
        return cfg
    path = Path(cfg.path)
    if not path.is_absolute():
        path = base_dir / path
    if check_paths and not path.exists():
        raise ConfigError(f"{where}.path {cfg.path!r} does not exist (looked at {path}); point it at a directory or file of documents")
    cfg.path = str(path)
    return cfg


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    _no_unknown(raw, {f.name for f in fields(cls)}, where)
    try:
        return cls(**raw)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _no_unknown(raw: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys are {', '.join(sorted(known))}")


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    for k, v in override.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base
