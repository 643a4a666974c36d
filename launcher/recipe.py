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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag

from topology.errors import ConfigError
from topology.files import load_data
from trainer import storage
from trainer.config import COLLECTIVE_TIMEOUT_S, DEFAULT_DEEPSPEED, DataConfig, ModelConfig, StageConfig
from trainer.model.rope import ntk_theta, scaling_law_theta
from trainer.schema import Count, DeepSpeedKeys, PathName, PositiveFloat, PositiveInt, Seed, validate
from trainer.reporting.tracking import TrackingConfig

AUTO = "auto"
Auto = Literal["auto"]


@dataclass
class ThetaRule:
    """How a stage's RoPE theta is chosen."""

    rule: Literal["ntk", "scaling-law"]
    alpha: PositiveFloat = 4.0
    base_stage: str | None = None
    """For ``ntk``: the stage whose theta and length it scales from (default: the previous stage)."""


Theta = Annotated[Union[Annotated[PositiveFloat, Tag("Number")], Annotated[ThetaRule, Tag("Rule")]],
                  Discriminator(lambda v: "Rule" if isinstance(v, (dict, ThetaRule)) else "Number")]
"""A finite positive number, or a mapping read as a ``ThetaRule``."""


@dataclass
class RecipeStage:
    """One stage as written in the recipe; may hold rules and ``auto``."""

    name: PathName
    """Also the stage directory's name (``stageN-NAME``), so it is never a path."""
    seq_len: PositiveInt
    rope_theta: Theta
    batch: PositiveInt | Auto
    steps: PositiveInt
    gpus: PositiveInt
    grad_accum: PositiveInt = 1
    lr: PositiveFloat = 2e-5
    ulysses: PositiveInt | Auto = 1
    checkpoint_every: Count = 0
    keep_checkpoints: PositiveInt = 2
    """Complete checkpoints kept on storage (the newest); older ones are deleted after each save."""
    min_gpus: PositiveInt | None = None
    """Fewest GPUs this stage may continue on after a host is lost (default: all of ``gpus``)."""
    data: DataConfig | None = None
    """Overrides the recipe's data for this stage (e.g. a chat stage)."""
    niah: dict[str, Any] | None = None
    """Run needle-in-a-haystack at the end of the stage with these settings."""
    published_tokens: PositiveInt | None = None
    """Total tokens as published, checked by the dry run against seq_len x batch x accumulation x steps."""
    train_batch_size: PositiveInt | None = None
    """Sequences per optimizer step (DeepSpeed's key) = batch x grad_accum. With ``batch: auto``
    the sizing keeps it and sets grad_accum; without it the written grad_accum stays."""

    def __post_init__(self) -> None:
        where = f"stage {self.name!r}"
        if self.min_gpus is not None and self.min_gpus > self.gpus:
            raise ConfigError(f"{where}: min_gpus ({self.min_gpus}) exceeds gpus ({self.gpus})")
        tbs = self.train_batch_size
        if tbs is not None and self.batch != AUTO and tbs != self.batch * self.grad_accum:
            raise ConfigError(f"{where}: train_batch_size ({tbs}) != batch ({self.batch}) x grad_accum ({self.grad_accum}); "
                              "fix one or write batch: auto")


@dataclass
class Recipe:
    name: PathName
    model: ModelConfig
    data: DataConfig
    stages: Annotated[list[RecipeStage], Field(min_length=1)]
    deepspeed: DeepSpeedKeys = field(default_factory=dict)
    """DeepSpeed's JSON keys, merged over ``trainer.config.DEFAULT_DEEPSPEED``."""
    run_dir: str = "runs"
    max_retries: Count = 2
    """Restarts of one stage after a worker or host failure before the run gives up."""
    gpu_type: str = "L40S"
    seed: Seed = 0
    collective_timeout: PositiveFloat = COLLECTIVE_TIMEOUT_S
    """Seconds a torch.distributed collective may wait (``ringleader run --collective-timeout`` overrides)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """TensorBoard (default), W&B, MLflow and Ray metrics: see trainer/reporting/tracking.py."""
    source: str = field(default="recipe", init=False, compare=False)
    """The file the recipe came from, for messages (not a recipe key)."""

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

    def check_heads(self, n_q: int, n_kv: int) -> None:
        """Raise a one-line ConfigError unless the model's heads split into every stage's Ulysses groups.

        transformers builds a Llama whose query heads are no multiple of its KV
        heads; the attention cannot run it (``kv_heads_for_ulysses``). Checked
        before Ray starts (``ringleader run``) and in a dry run, not first in the
        ranks. A stage whose ``ulysses`` is ``auto`` is sized to fit the heads.
        """
        from trainer.attention.ulysses import kv_heads_for_ulysses

        for where, ulysses in [("model", 1)] + [(f"stage {s.name!r}", s.ulysses) for s in self.stages if s.ulysses != AUTO]:
            try:
                kv_heads_for_ulysses(n_q, n_kv, int(ulysses))
            except ConfigError as exc:
                raise ConfigError(f"{self.source}: {where}: {exc}") from None

    def stage_configs(self, run_dir: str | os.PathLike) -> list[StageConfig]:
        """Resolved StageConfigs, each stage initialised from the previous one's HF model."""
        thetas = self.resolve_theta()
        out: list[StageConfig] = []
        deepspeed = _merge(copy.deepcopy(DEFAULT_DEEPSPEED), self.deepspeed)
        prev_hf: str | None = None
        errors: list[str] = []  # every stage's shape problem, not just the first
        for i, s in enumerate(self.stages):
            if AUTO in (s.batch, s.ulysses):
                raise ConfigError(f"{self.source}: stage {s.name!r}: batch/ulysses are 'auto'; size the recipe for a cluster first (ringleader run --dry-run shows the choice)")
            stage_dir = storage.join(run_dir, f"stage{i}-{s.name}")  # a path or an object store URI
            try:
                cfg = StageConfig(
                    name=s.name, seq_len=s.seq_len, rope_theta=thetas[s.name], batch=int(s.batch), steps=s.steps,
                    gpus=s.gpus, model=self.model, data=s.data or self.data, output_dir=str(stage_dir),
                    grad_accum=s.grad_accum, lr=s.lr, ulysses=int(s.ulysses), checkpoint_every=s.checkpoint_every,
                    keep_checkpoints=s.keep_checkpoints,
                    init_from=prev_hf, deepspeed=copy.deepcopy(deepspeed), seed=self.seed, niah=s.niah,
                    collective_timeout=self.collective_timeout, tracking=copy.deepcopy(self.tracking),
                )
            except ConfigError as exc:
                errors.append(f"{self.source}: {exc}")
                continue
            out.append(cfg)
            prev_hf = storage.join(stage_dir, storage.HF_POINTER)
        if errors:
            raise ConfigError("\n".join(errors))
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, check_paths: bool = True) -> "Recipe":
        """Read and validate a recipe; ``check_paths=False`` (dry runs) skips the data-exists check,
        since data usually lives on the cluster's shared filesystem, not where the dry run is."""
        return cls.from_dict(load_data(path), base_dir=Path(path).resolve().parent, source=str(path), check_paths=check_paths)

    @classmethod
    def from_dict(cls, data: Any, base_dir: Path | None = None, source: str = "recipe", check_paths: bool = True) -> "Recipe":
        """Validate a recipe mapping as a whole; raises one ConfigError listing every problem, one line each.

        Every field's type and range come from the annotations above (``trainer.schema``);
        what spans fields or stages (unique names, theta rules, shapes, paths) is checked after.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level")
        raw, errors = _spelled_out(data, source)
        try:
            recipe = validate(cls, raw, source)
        except ConfigError as exc:
            raise ConfigError("\n".join([*errors, str(exc)])) from None
        recipe.source = source
        errors += recipe._check(base_dir or Path.cwd(), check_paths)
        if errors:
            raise ConfigError("\n".join(errors))
        return recipe

    def _check(self, base_dir: Path, check_paths: bool) -> list[str]:
        """Checks across fields and stages, and paths; resolves relative paths against ``base_dir``."""
        errors: list[str] = []

        def collect(check: Any, *args: Any) -> Any:
            try:
                return check(*args)
            except ConfigError as exc:
                errors.extend(str(exc).splitlines())
                return None

        model = self.model
        if model.path and not Path(model.path).is_absolute() and (base_dir / model.path).exists():
            model.path = str(base_dir / model.path)
        elif model.path and (model.path.startswith((".", "/")) and not Path(model.path).exists()):
            errors.append(f"{self.source}: model.path {model.path!r} does not exist; give a local directory or a hub name")
        collect(_resolve_data, self.data, base_dir, f"{self.source}: data", check_paths)
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            errors.append(f"{self.source}: stage names must be unique, got {names}")
        seen: set[str] = set()
        for s in self.stages:
            where = f"{self.source}: stage {s.name!r}"
            if s.data is not None:
                collect(_resolve_data, s.data, base_dir, f"{where}: data", check_paths)
            if s.niah is not None:
                s.niah = collect(_niah, s.niah, base_dir, f"{where}: niah")
            t = s.rope_theta
            if isinstance(t, ThetaRule) and t.base_stage and t.base_stage not in seen:
                errors.append(f"{where}: rope_theta.from names {t.base_stage!r}, which is not an earlier stage")
            seen.add(s.name)
        if errors:
            return errors
        if any(AUTO in (s.batch, s.ulysses) for s in self.stages):
            collect(self.resolve_theta)  # shapes are checked once sizing has filled in 'auto'
        else:
            collect(self.stage_configs, self.run_dir)  # resolves theta; each StageConfig checks its own shape
        return errors


def _spelled_out(data: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """The recipe with its shorthands written out (``ring: N``, ``rope_theta.from``); problems with them as lines."""
    raw = dict(data)
    errors: list[str] = []
    if "source" in raw:
        errors.append(f"{source}: unknown key 'source'")
        raw.pop("source")
    if raw.get("deepspeed", {}) is None:  # `deepspeed:` with nothing under it
        raw.pop("deepspeed")
    if "tracking" in raw:  # which trackers are installed is checked here, before anything starts
        try:
            raw["tracking"] = TrackingConfig.from_dict(raw["tracking"], f"{source}: tracking", name=str(raw.get("name", "")))
        except ConfigError as exc:
            errors.append(str(exc))
            raw.pop("tracking")
    stages = raw.get("stages")
    if isinstance(stages, list):
        raw["stages"] = [_stage_spelled_out(s, i, source, errors) for i, s in enumerate(stages)]
    return raw, errors


def _stage_spelled_out(raw: Any, i: int, source: str, errors: list[str]) -> Any:
    if not isinstance(raw, dict):
        return raw
    raw = dict(raw)
    raw.setdefault("name", str(i))
    if "ring" in raw:  # ring size is the other face of batch: ring = gpus / batch
        where = f"{source}: stage {raw['name']!r}"
        ring, batch, gpus = raw.pop("ring"), raw.get("batch"), raw.get("gpus")
        if batch is not None:
            errors.append(f"{where}: give 'batch' or 'ring', not both (ring size = gpus / batch)")
        elif ring == AUTO:
            raw["batch"] = AUTO
        elif type(ring) is not int or ring < 1 or type(gpus) is not int or gpus % ring:
            errors.append(f"{where}: ring is {ring!r}; it must be 'auto' or a whole number that divides gpus ({gpus})")
            raw["batch"] = 1  # stands in, so the other fields are still checked
        else:
            raw["batch"] = gpus // ring
    theta = raw.get("rope_theta")
    if isinstance(theta, dict) and "from" in theta:
        theta = dict(theta)
        theta["base_stage"] = str(theta.pop("from"))
        raw["rope_theta"] = theta
    return raw


def _niah(raw: Any, base_dir: Path, where: str) -> dict[str, Any]:
    """Validate a stage's ``niah:`` now, so a typo fails before any rank trains."""
    from trainer.niah.evaluate import NiahConfig  # imports torch: only for recipes that ask for NIAH

    return asdict(NiahConfig.from_dict(raw, source=where, base_dir=base_dir))


def _resolve_data(cfg: DataConfig, base_dir: Path, where: str, check_paths: bool = True) -> None:
    if cfg.path is None:  # a generated corpus (data.synthetic)
        return
    path = Path(cfg.path)
    if not path.is_absolute():
        path = base_dir / path
    if check_paths and not path.exists():
        raise ConfigError(f"{where}.path {cfg.path!r} does not exist (looked at {path}); point it at a directory or file of documents")
    cfg.path = str(path)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    for k, v in override.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base
