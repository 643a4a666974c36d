"""The process group and the DeepSpeed engine of one stage.

DeepSpeed's data-parallel group is the whole world: every rank, context
parallel or not, holds the same parameters, so ZeRO partitions them (and the
optimizer state) over all ``W`` ranks and averages gradients over all of
them; ``trainer.model.loss.loss_scale`` makes that average the right one.

On CPU (tests, laptops) DeepSpeed's CPU accelerator runs over gloo
(``DS_ACCELERATOR=cpu``) in fp32, ZeRO-3 included; on CUDA the stage runs
NCCL and bf16.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import os
import re
import sys
from types import ModuleType, SimpleNamespace
from typing import Any, Iterator, NoReturn

import torch
import torch.distributed as dist

from topology.errors import ConfigError
from trainer.config import COLLECTIVE_TIMEOUT_S, StageConfig

log = logging.getLogger(__name__)


def init_process_group(timeout_s: float = COLLECTIVE_TIMEOUT_S) -> torch.device:
    """Join (or reuse) the default process group from torchrun's variables; returns this rank's device.

    NCCL when CUDA is present, gloo otherwise. The GPU is ``cuda:LOCAL_RANK``
    when the process sees all of its host's GPUs (torchrun), ``cuda:0`` when
    it sees only its own (Ray sets CUDA_VISIBLE_DEVICES per worker).
    """
    # DeepSpeed reads LOCAL_RANK even when the group already exists.
    needed = ("LOCAL_RANK",) if dist.is_initialized() else ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [v for v in needed if v not in os.environ]
    if missing:
        raise ConfigError(f"environment variable(s) {', '.join(missing)} not set; start ranks with torchrun or the ringleader launcher")
    cuda = torch.cuda.is_available()
    device = torch.device("cpu")
    if cuda:
        visible, local = torch.cuda.device_count(), int(os.environ.get("LOCAL_RANK", "0"))
        if visible > 1 and local >= visible:
            raise ConfigError(f"LOCAL_RANK is {local} but this process sees {visible} GPUs; start one rank per GPU")
        device = torch.device("cuda", 0 if visible == 1 else local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if cuda else None)
    return device


def end_rank_process(code: int) -> NoReturn:
    """Flush the streams and end this rank's process, skipping interpreter finalization.

    For a process that exists only to be one rank (spawned, or started by
    torchrun), called after the process group is destroyed. Gloo's worker
    threads drop a finished collective's tensors after the caller has moved
    on; when that comes while the interpreter finalizes, the thread cannot
    take the GIL, is cancelled inside a C++ destructor, and a rank that
    succeeded dies of SIGABRT ("terminate called without an active
    exception"). It happened in about one of 30 two-rank evaluations on 2
    cores. With ``os._exit`` there is no finalization left to race.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def agree(error: str | None) -> None:
    """Collective: if any rank has an error, every rank raises the first one.

    Input is checked rank by rank (each host sees its own files); without
    this a rank that finds nothing wrong would wait forever in its first
    collective for the ranks that stopped.
    """
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
    if failed:
        rank, message = failed[0]
        same = len(failed) == len(errors) and all(m == message for _, m in failed)
        raise ConfigError(message if same else f"rank {rank}: {message}")


DECAYING_SCHEDULERS = ("WarmupDecayLR", "WarmupCosineLR")
"""DeepSpeed schedulers that decay to ``total_num_steps``; a recipe may leave it out to mean the stage's steps."""


def deepspeed_config(cfg: StageConfig, cuda: bool) -> dict[str, Any]:
    """The stage's DeepSpeed JSON config: the recipe's keys plus batch, accumulation, lr and precision.

    One sequence per rank per micro-step (a ring shares it); DeepSpeed
    derives ``train_batch_size`` as micro x accumulation x world.
    """
    ds = copy.deepcopy(cfg.deepspeed)
    ds.pop("train_batch_size", None)
    ds["train_micro_batch_size_per_gpu"] = 1
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    optimizer.setdefault("params", {})["lr"] = cfg.lr
    scheduler = ds.get("scheduler") or {}
    if scheduler.get("type") in DECAYING_SCHEDULERS:
        # A recipe's decay spans each stage: every stage warms up and decays over its own steps.
        scheduler.setdefault("params", {}).setdefault("total_num_steps", cfg.steps)
    if cuda:
        if not ds.get("fp16", {}).get("enabled"):
            ds["bf16"] = {**ds.get("bf16", {}), "enabled": True}
        if optimizer["type"].lower() in ("adam", "adamw") and not fused_adam_available():
            log.warning("DeepSpeed's FusedAdam is neither prebuilt nor buildable here (no nvcc under CUDA_HOME); "
                        "using torch's AdamW. Install the CUDA toolkit or DS_BUILD_FUSED_ADAM=1 deepspeed for the fused kernel")
            optimizer["params"]["torch_adam"] = True
    else:
        ds["bf16"] = {"enabled": False}
        ds["fp16"] = {"enabled": False}
        if optimizer["type"].lower() in ("adam", "adamw"):
            # torch's AdamW: DeepSpeed's CPU FusedAdam would need a C++ build at first use.
            optimizer["params"]["torch_adam"] = True
    return ds


ARCH_TARGET = re.compile(r"(\d+)\.(\d+)[a-z]?(\+PTX)?")
"""One ``TORCH_CUDA_ARCH_LIST`` target: ``9.0``, ``9.0a`` (arch-specific), ``10.0f`` (family), ``8.6+PTX``."""


def deepspeed_arch_list(value: str) -> str | None:
    """``TORCH_CUDA_ARCH_LIST`` as DeepSpeed's JIT builder can read it; None where it names no target it can.

    PyTorch takes arch-specific targets such as ``9.0a`` (CUDA images for
    Hopper set them), but DeepSpeed 0.19 reads each part of a target as an
    integer and fails the first step building FusedAdam. Its ops use no
    wgmma or TMA, so the plain target of the same version builds the same
    kernel. Names PyTorch also takes (``Hopper``) are dropped; with nothing
    left, DeepSpeed asks the device.
    """
    targets = []
    for token in value.replace(" ", ";").split(";"):
        match = ARCH_TARGET.fullmatch(token.strip())
        if match:
            targets.append(f"{match[1]}.{match[2]}{match[3] or ''}")
    return ";".join(dict.fromkeys(targets)) or None


def prepare_jit_build() -> None:
    """Make this process's ``TORCH_CUDA_ARCH_LIST`` one DeepSpeed can build its CUDA ops for (see above)."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if value is None:
        return
    readable = deepspeed_arch_list(value)
    if readable != value:
        log.info("TORCH_CUDA_ARCH_LIST %r read as %r for DeepSpeed's op builds", value, readable)
        if readable is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = readable


def fused_adam_available() -> bool:
    """Whether DeepSpeed can give this GPU host its FusedAdam: prebuilt into the wheel, or JIT-built with nvcc.

    A host with only the CUDA runtime (pip's torch wheels) has no compiler,
    and DeepSpeed would fail at the first step; torch's AdamW is the way out.
    """
    from torch.utils.cpp_extension import CUDA_HOME

    if import_deepspeed().git_version_info.installed_ops.get("fused_adam"):
        return True
    return CUDA_HOME is not None and os.access(os.path.join(CUDA_HOME, "bin", "nvcc"), os.X_OK)


MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


class _MuonNotUsed:
    """Takes the place of DeepSpeed's ``MuonWithAuxAdam`` in a process that never builds it."""


def import_deepspeed(muon: bool = False) -> Any:
    """``deepspeed``, imported without two optional parts that ringleader's ranks never run.

    * DeepSpeed's autotuner imports ``mlflow`` whenever it is installed (the
      ``tracking`` extra installs it), which costs every rank about 2 s of
      CPU at start-up. The hook is kept out only while DeepSpeed loads:
      ``mlflow`` imports as usual afterwards, for the MLflow tracker
      (``trainer.reporting.tracking``).
    * ZeRO-1/2/3 and the bf16 optimizer import ``MuonWithAuxAdam`` when they
      are built, only to test ``isinstance(optimizer, MuonWithAuxAdam)``.
      That import applies ``torch.compile`` to Muon's kernels, which loads
      TorchInductor: about 2 s of CPU per rank, in every stage. Unless
      ``muon`` (the stage's DeepSpeed config asks for Muon), a class that
      no optimizer is an instance of answers the test instead.

    Every import of DeepSpeed in ringleader goes through here.
    """
    if muon:
        if getattr(sys.modules.get(MUON_MODULE), "MuonWithAuxAdam", None) is _MuonNotUsed:
            del sys.modules[MUON_MODULE]
    elif MUON_MODULE not in sys.modules:
        stand_in = ModuleType(MUON_MODULE, "Stands in for DeepSpeed's Muon optimizer (see trainer.engine.import_deepspeed).")
        stand_in.MuonWithAuxAdam = _MuonNotUsed  # type: ignore[attr-defined]
        sys.modules[MUON_MODULE] = stand_in
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # "import mlflow" raises ImportError meanwhile
    try:
        import deepspeed
    finally:
        if hide:
            del sys.modules["mlflow"]
    return deepspeed


def make_engine(model: torch.nn.Module, ds_config: dict[str, Any], device: torch.device,
                timeout_s: float = COLLECTIVE_TIMEOUT_S) -> Any:
    """``deepspeed.initialize`` on an existing process group and device; returns the engine.

    DeepSpeed picks ``cuda:LOCAL_RANK`` unless told the device (``args.device_rank``),
    which is wrong for a process that sees only its own GPU. Its communication
    backend is set up first with the stage's collective timeout (DeepSpeed's own
    default is 10 minutes, ``DEEPSPEED_TIMEOUT``).
    """
    deepspeed = import_deepspeed(muon=str(ds_config.get("optimizer", {}).get("type", "")).lower() == "muon")
    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s), dist_init_required=False, verbose=False)
    if device.type == "cuda":
        prepare_jit_build()
    args = SimpleNamespace(device_rank=device.index) if device.type == "cuda" else None
    engine, *_ = deepspeed.initialize(args=args, model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds_config, dist_init_required=False)
    return engine


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


@contextlib.contextmanager
def zero3_construction(ds_config: dict[str, Any]) -> Iterator[None]:
    """Models built inside are created straight into ZeRO-3 partitions (a no-op below stage 3).

    transformers builds a model under ``deepspeed.zero.Init`` while an
    ``HfDeepSpeedConfig`` is alive (it keeps a weak reference; ``accelerate``
    must be installed): every rank then allocates only its ``1/N`` share of
    each parameter, and ``from_pretrained`` copies each checkpoint tensor
    into its partitions as it reads it. So no rank ever holds the whole model
    (16 GB for Llama-3-8B in bf16, times the ranks of a host). The reference
    is dropped on exit, so models built later (evaluation) are whole again.
    """
    if zero_stage(ds_config) != 3:
        yield
        return
    import_deepspeed()  # before transformers imports it
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  (transformers holds only a weak reference)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
