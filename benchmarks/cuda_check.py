"""The CUDA paths on one GPU, in one run: kernels against fp64, the block kernel's speed, a real stage.

    python benchmarks/cuda_check.py                      # a machine with a CUDA GPU; a few minutes
    python benchmarks/cuda_check.py --part stage --seq 32768

Each part runs in a process of its own, so one that fails (its error is
printed) does not hide the others; the exit status is the number of parts
that failed.

1. ``tests``: the suite's CUDA cases and their meta-device twins: flash
   (bf16) and memory-efficient (fp32) block kernels merged by log-sum-exp,
   varlen flash calls under document masks, and every rank's steps of the
   zigzag ring (plain causal and document-masked) in one process, all
   against fp64 attention.
2. ``kernels``: one ring step's block kernel at Llama-3-8B shapes (32 query
   heads, 8 KV heads, head dim 128) at 16K tokens per rank, bf16: ms and
   TFLOPS (``benchmarks/ring_attention.kernel_tflops``).
3. ``stage``: a world of one rank on this GPU, started as torchrun starts
   one (NCCL). It calibrates (``launcher.commands.calibrate.measure_rank``),
   runs the stage's layout at 32 tokens (the fixed cost of a step, as
   ``predict_vs_measure.py`` takes it), then the stage itself
   (``trainer.stage.run_stage``: DeepSpeed ZeRO-3 in bf16, ring attention,
   activation checkpointing) on a 0.5B-parameter Llama shape (8 of
   Llama-3.2-1B's layers, a byte-level vocabulary). Prints the loss, tokens/s, model FLOPs
   utilisation against the GPU's dense bf16 peak, and the cost model's
   predicted micro-step beside the measured one.

DeepSpeed builds its fused Adam kernel at first use (ninja and nvcc); the
build starts in the background as the run begins, while the tests run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tests", REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

PARTS = ("tests", "kernels", "stage")
TESTS = ["tests/test_ring_attention.py", "tests/test_documents.py"]
TEST_FILTER = "cuda or meta or zigzag_ring_steps"
GPU_MODEL = {"tiny": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 8, "num_attention_heads": 32,
                      "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 264},
             "base_theta": 500_000.0, "base_len": 8192, "head_dim": 64}
"""Half of Llama-3.2-1B's layers (0.49B parameters: its 128K-token embeddings left out) on the byte-level tokenizer."""
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
"""Dense bf16 peak by device name (vendor data sheets, without sparsity)."""


def prebuild_fused_adam() -> subprocess.Popen:
    """DeepSpeed's FusedAdam, JIT-built into its extension cache by a background process (where nvcc is)."""
    code = ("from trainer.engine import fused_adam_available, prepare_jit_build\n"
            "prepare_jit_build()\n"
            "if fused_adam_available():\n"
            "    from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load(); print('fused adam built')\n"
            "else:\n"
            "    print('no nvcc here: the stage runs torch AdamW instead of FusedAdam')")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def part_tests(args: argparse.Namespace) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *TESTS, "-k", TEST_FILTER]
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=REPO).returncode
    if rc:
        raise SystemExit(f"pytest exited with {rc}")


def part_kernels(args: argparse.Namespace) -> None:
    from ring_attention import kernel_tflops

    kernel_tflops(args.kernel_tokens)


def _peak_tflops(name: str) -> float | None:
    return next((v for k, v in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])) if k in name), None)


def part_stage(args: argparse.Namespace) -> None:
    from dataclasses import replace

    import torch

    import predict_vs_measure as pvm
    from launcher.commands.calibrate import measure_rank, summary
    from launcher.estimate.fit import overhead_figure, predict_stage
    from launcher.estimate.memory import model_shape
    from ray_utils import free_port
    from topology.cost import HardwareRates, sequence_flops
    from trainer.config import ModelConfig
    from trainer.engine import init_process_group
    from trainer.stage import run_stage

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    device = init_process_group()
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    model = pvm.MODEL if args.tiny else GPU_MODEL
    backend = torch.distributed.get_backend()
    print(f"one rank on {name}, backend {backend}", flush=True)
    spec, meta = pvm._spec(1, args.seq, args.repeats, False, 1, model=model, backend=backend)
    t0 = time.perf_counter()
    samples = measure_rank(spec, device)
    cal = pvm._build([samples], 1, meta, device=name)
    print(f"calibrated in {time.perf_counter() - t0:.0f} s\n{summary(cal)}", flush=True)
    metrics: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="cuda-check-") as tmp:
        small = pvm._stage(Path(tmp), 1, 32, 1, pvm.steps_for(32, args.steps), "small", model)
        stage = pvm._stage(Path(tmp), 1, args.seq, 1, args.steps, "stage", model)
        stamps = []
        for cfg, plan in (small, stage):
            t0 = time.perf_counter()
            times: list[float] = []
            seen: list[dict] = []
            run_stage(cfg, plan, on_metrics=lambda m: (times.append(time.perf_counter()), seen.append(m)))
            stamps.append(times)
            metrics = seen
            print(f"stage {cfg.name} ({cfg.seq_len} tokens, {cfg.steps} steps) in {time.perf_counter() - t0:.0f} s", flush=True)
    overhead = overhead_figure(pvm._steps(stamps[0]), *small, cal, "stage at 32 tokens on 1 rank", on_cpu=not cuda)
    cal = replace(cal, step_overhead_s=overhead)
    print(f"step overhead from the stage at 32 tokens: {overhead.value * 1e3:.1f} ms", flush=True)
    measured = statistics.median(pvm._steps(stamps[1]))
    rates = HardwareRates.from_calibration(cal)
    predicted = predict_stage(stage[0], stage[1], rates, on_cpu=not cuda)
    device_s = predict_stage(stage[0], stage[1], replace(rates, step_overhead_s=0.0), on_cpu=not cuda)
    shape, _ = model_shape(ModelConfig(**model))
    seq = args.seq
    flops = sequence_flops(shape, seq)
    peak = _peak_tflops(name)
    losses = [m["loss"] for m in metrics if "loss" in m]
    print(f"\nstage on one {name}: {shape.params / 1e9:.2f}B parameters, {seq} tokens, ZeRO-3, {'bf16' if cuda else 'fp32'}, "
          f"activation checkpointing {'on' if stage[0].activation_checkpointing else 'off'}")
    print(f"  loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    print(f"  measured micro-step {measured * 1e3:.0f} ms ({seq / measured:,.0f} tokens/s), "
          f"model {flops / measured / 1e12:.0f} TFLOPS" + (f", MFU {flops / measured / 1e12 / peak:.1%} of {peak:.0f}" if peak else ""))
    print(f"  predicted micro-step {predicted * 1e3:.0f} ms: {(predicted - measured) / measured:+.0%} "
          f"(compute and traffic {device_s * 1e3:.0f} ms, host overhead {overhead.value * 1e3:.0f} ms, "
          f"{'hidden behind the device' if cuda else 'added: same cores'})")
    if cuda:
        print(f"  peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    torch.distributed.destroy_process_group()
    if not all(map(lambda x: x == x, losses)) or losses[-1] >= losses[0]:
        raise SystemExit(f"loss did not fall: {losses}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=PARTS, action="append", help="run only these parts (default: all)")
    parser.add_argument("--seq", type=int, default=16384, help="tokens of the stage's sequence (one rank holds it all)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps of the stage (the first two are not timed)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of each calibration measurement")
    parser.add_argument("--kernel-tokens", type=int, default=16384, help="tokens per rank of the block kernel table")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per part")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny Llama in the stage (a quick look at the "
                        "script itself; with --worker stage it also runs on CPU)")
    parser.add_argument("--worker", choices=PARTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        try:
            globals()[f"part_{args.worker}"](args)
        except SystemExit:
            raise
        except BaseException:
            traceback.print_exc()
            return 1
        return 0
    import torch

    if not torch.cuda.is_available():
        print("cuda_check: error: no CUDA device here; run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    builder = prebuild_fused_adam() if "stage" in (args.part or PARTS) else None
    failed = []
    for part in args.part or PARTS:
        if part == "stage" and builder is not None:
            out, _ = builder.communicate()
            print(out.strip().splitlines()[-1] if out.strip() else f"fused adam build exited {builder.returncode}", flush=True)
        print(f"\n=== {part}", flush=True)
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--worker", part, *(argv if argv is not None else sys.argv[1:])]
        try:
            rc = subprocess.run(cmd, cwd=REPO, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        print(f"=== {part}: {'ok' if rc == 0 else f'FAILED ({rc})'} in {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(part)
    print(f"\nparts failed: {', '.join(failed) or 'none'}")
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())
