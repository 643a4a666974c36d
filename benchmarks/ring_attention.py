"""Ring attention: peak memory and time per rank at a fixed total sequence, C = 1, 2, 4.

Each ring size runs as its own torchrun job (fresh processes, so peak memory
is that run's), on CPU with gloo or on CUDA with NCCL when there are C GPUs.
The sequence is fixed, so each rank's block shrinks as C grows: peak memory
per rank should fall roughly as 1/C, the whole point of ring attention.

    python benchmarks/ring_attention.py                     # CPU, 8K tokens, C = 1 2 4
    python benchmarks/ring_attention.py --seq 16384 --cp 1 2
    python benchmarks/ring_attention.py --seq 131072 --heads 32 --kv-heads 8 --head-dim 128   # 4+ GPUs

On CUDA it also measures the block kernel (the work of one ring step) in
TFLOPS at Llama-3-8B shapes (32 query heads, 8 KV heads, head dim 128) and
16K tokens per rank, bf16.

Memory on CPU is the resident-set high-water mark (getrusage) minus the
resident set just before the inputs are made; on CUDA it is
torch.cuda.max_memory_allocated minus what was allocated before.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from topology.plan import Plan, RankPlacement  # noqa: E402
from trainer.engine import init_process_group  # noqa: E402
from trainer.groups import ParallelGroups  # noqa: E402
from trainer.attention.ring_attention import block_backward, block_forward, ring_attention  # noqa: E402

MIB = 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def worker(args: argparse.Namespace) -> None:
    """One rank under torchrun: time forward and backward of ring attention on its shard."""
    device = init_process_group()
    cuda = device.type == "cuda"
    world, rank = dist.get_world_size(), dist.get_rank()
    plan = Plan("naive", 1, world, 1, args.seq, [RankPlacement(r, "local", r) for r in range(world)])
    groups = ParallelGroups.from_plan(plan)
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    s_local = args.seq // world

    # A small warm-up first: the kernels' first call maps code pages and
    # thread pools, which would otherwise count as memory of the big run.
    small = torch.randn(1, 2 * world, args.heads, args.head_dim, device=device, dtype=dtype, requires_grad=True)
    ring_attention(small, small[:, :, :args.kv_heads], small[:, :, :args.kv_heads], groups).sum().backward()
    del small
    dist.barrier()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    gen = torch.Generator(device=device).manual_seed(rank)
    shape_q = (1, s_local, args.heads, args.head_dim)
    shape_kv = (1, s_local, args.kv_heads, args.head_dim)
    q = torch.randn(shape_q, generator=gen, device=device, dtype=dtype).requires_grad_()
    k = torch.randn(shape_kv, generator=gen, device=device, dtype=dtype).requires_grad_()
    v = torch.randn(shape_kv, generator=gen, device=device, dtype=dtype).requires_grad_()
    dout = torch.randn(shape_q, generator=gen, device=device, dtype=dtype)

    fwd, bwd = [], []
    for _ in range(args.repeats):
        q.grad = k.grad = v.grad = None
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        out = ring_attention(q, k, v, groups)
        sync()
        t1 = time.perf_counter()
        out.backward(dout)
        sync()
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        del out
    peak = (torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()) - base
    mine = {"rank": rank, "peak_mib": peak / MIB, "fwd_s": statistics.median(fwd), "bwd_s": statistics.median(bwd)}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        print("RESULT " + json.dumps({"cp": world, "device": device.type, "ranks": everyone}), flush=True)
    dist.destroy_process_group()


def run_ring_size(args: argparse.Namespace, cp: int) -> dict:
    """Start one torchrun job of ``cp`` ranks and return rank 0's summary."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cp}", __file__, "--worker",
           f"--seq={args.seq}", f"--heads={args.heads}", f"--kv-heads={args.kv_heads}",
           f"--head-dim={args.head_dim}", f"--repeats={args.repeats}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // cp)))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"C={cp} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def kernel_tflops(s_local: int = 16384, n_q: int = 32, n_kv: int = 8, d: int = 128, repeats: int = 5) -> None:
    """TFLOPS of one ring step's block kernel at Llama-3-8B shapes (CUDA, bf16)."""
    dev = torch.device("cuda")
    q = torch.randn(1, n_q, s_local, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, n_kv, s_local, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    dout = torch.randn_like(q)
    scale = d ** -0.5
    print(f"\nblock kernel, {s_local} tokens per rank, {n_q} q heads, {n_kv} kv heads, head dim {d}, bf16 "
          f"({torch.cuda.get_device_name()})")
    print(f"{'step':<28}{'fwd ms':>9}{'fwd TFLOPS':>12}{'bwd ms':>9}{'bwd TFLOPS':>12}")
    half = s_local // 2
    cases = [("local block (causal)", q, k, v, True, 0.5 * s_local * s_local),
             ("q x first half of k", q, k[:, :, :half], v[:, :, :half], False, s_local * half),
             ("second half of q x k", q[:, :, half:], k, v, False, half * s_local)]
    for name, bq, bk, bv, causal, pairs in cases:
        flops = 4 * pairs * n_q * d
        out, lse = block_forward(bq, bk, bv, causal, scale)
        grad = dout[:, :, :bq.shape[2]]
        block_backward(grad, bq, bk, bv, out, lse, causal, scale)
        times = {"fwd": [], "bwd": []}
        for _ in range(repeats):
            e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            e[0].record()
            out, lse = block_forward(bq, bk, bv, causal, scale)
            e[1].record()
            block_backward(grad, bq, bk, bv, out, lse, causal, scale)
            e[2].record()
            torch.cuda.synchronize()
            times["fwd"].append(e[0].elapsed_time(e[1]))
            times["bwd"].append(e[1].elapsed_time(e[2]))
        fwd_ms, bwd_ms = statistics.median(times["fwd"]), statistics.median(times["bwd"])
        print(f"{name:<28}{fwd_ms:>9.2f}{flops / fwd_ms / 1e9:>12.1f}{bwd_ms:>9.2f}{2.5 * flops / bwd_ms / 1e9:>12.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192, help="total tokens of the sequence (fixed across C)")
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4], help="ring sizes to run")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per ring size")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    print(f"ring attention, {args.seq} tokens, {args.heads} q heads, {args.kv_heads} kv heads, head dim {args.head_dim}, "
          f"fwd+bwd, median of {args.repeats}, {'CUDA' if torch.cuda.is_available() else f'CPU ({os.cpu_count()} cores)'}")
    print(f"{'C':>3}{'tokens/rank':>13}{'peak MiB/rank':>15}{'vs C=1':>8}{'fwd s':>9}{'bwd s':>9}{'tokens/s':>11}")
    first = None
    for cp in args.cp:
        result = run_ring_size(args, cp)
        peak = max(r["peak_mib"] for r in result["ranks"])
        fwd = max(r["fwd_s"] for r in result["ranks"])
        bwd = max(r["bwd_s"] for r in result["ranks"])
        first = first or peak
        print(f"{cp:>3}{args.seq // cp:>13}{peak:>15.1f}{peak / first:>8.2f}{fwd:>9.3f}{bwd:>9.3f}"
              f"{args.seq / (fwd + bwd):>11.0f}", flush=True)
    if torch.cuda.is_available():
        kernel_tflops()
    else:
        print("\nblock kernel TFLOPS: skipped (no CUDA device; needs a GPU for Llama-3-8B shapes at 16K tokens per rank)")


if __name__ == "__main__":
    main()
