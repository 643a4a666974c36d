"""Ring attention beside plain SDPA and torch's own context parallel: peak memory and time per rank.

Every configuration runs in a fresh torchrun job (CPU with gloo, or CUDA with
NCCL when there are C GPUs), so its peak memory is its own. The sequence is
fixed, so each rank's block shrinks as C grows: peak memory per rank should
fall about as 1/C. Side by side, in one run:

* ``sdpa``: ``F.scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)``
  on the whole sequence in one process (the memory target for C = 1);
* ``torch-cp``: ``torch.distributed.tensor.experimental.context_parallel``
  around the same SDPA call (or one line saying why it cannot run here);
* ``ringleader``: zigzag ring attention at each C, causal and under
  document masks (``--doc-len`` tokens per document: with short documents
  most blocks have nothing to attend and are skipped).

Then the per-rank work imbalance (max / mean query-key pairs a rank attends)
under realistic document-length mixes at R = 2..256, the whole-sequence
zigzag beside the per-document zigzag that document masks train with.

    python benchmarks/ring_attention.py                     # CPU, 8K tokens, C = 1 2 4
    python benchmarks/ring_attention.py --seq 16384 --cp 1 2 --doc-len 512
    python benchmarks/ring_attention.py --seq 131072 --heads 32 --kv-heads 8 --head-dim 128   # 4+ GPUs

On CUDA it also measures the block kernel (the work of one ring step) in
TFLOPS at Llama-3-8B shapes (32 query heads, 8 KV heads, head dim 128) and
16K tokens per rank, bf16.

Memory is the peak above what was allocated once the inputs existed: on
CUDA ``torch.cuda.max_memory_allocated``; on CPU, where torch's allocator
keeps no statistics, the resident set sampled every 0.2 ms by a thread
during forward and during backward (a transient that lives under 0.2 ms can
be missed; every tensor here lives longer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from topology.planning.plan import Plan, RankPlacement  # noqa: E402
from trainer.engine import init_process_group  # noqa: E402
from trainer.groups import ParallelGroups  # noqa: E402
from trainer.attention.documents import Documents  # noqa: E402
from trainer.attention.ring_attention import block_backward, block_forward, ring_attention  # noqa: E402
from trainer.attention.zigzag import shard  # noqa: E402

MIB = 2**20


# ------------------------------------------------------------------ memory probes
class PeakRss:
    """Highest resident set seen by a sampling thread since ``reset()`` (CPU)."""

    def __init__(self, interval_s: float = 2e-4) -> None:
        self.interval_s = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def read(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(self.interval_s)

    def reset(self) -> int:
        self.peak = self.read()
        return self.peak

    def high(self) -> int:
        return max(self.peak, self.read())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class PeakCuda:
    def reset(self) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def high(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ one configuration (a torchrun job)
def _documents(seq: int, doc_len: int) -> Documents | None:
    return None if doc_len <= 0 else Documents((tuple(range(0, seq, doc_len)) + (seq,),))


def _attention_fn(args: argparse.Namespace, device: torch.device):
    """(prepare(q, k, v, dout) -> local tensors, attend(q, k, v) -> out) for the configured kind."""
    world = dist.get_world_size()
    if args.kind == "sdpa":
        def attend(q, k, v):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, enable_gqa=True)
            return out.transpose(1, 2)
        return (lambda *t: t), attend, None
    if args.kind == "torch-cp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel

        mesh = init_device_mesh(device.type, (world,))

        def prepare(*tensors):
            # context_parallel shards its buffers in place along the sequence (dim 1 here).
            return tensors

        def attend(q, k, v):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, enable_gqa=True).transpose(1, 2)
        return prepare, attend, (mesh, context_parallel)
    plan = Plan("naive", 1, world, 1, args.seq, [RankPlacement(r, "local", r) for r in range(world)])
    groups = ParallelGroups.from_plan(plan)
    docs = _documents(args.seq, args.doc_len)
    return (lambda *t: tuple(shard(x, groups) for x in t)), (lambda q, k, v: ring_attention(q, k, v, groups, documents=docs)), None


def worker(args: argparse.Namespace) -> None:
    """One configuration under torchrun: time forward and backward, and their peak memory above the inputs."""
    device = init_process_group()
    cuda = device.type == "cuda"
    world, rank = dist.get_world_size(), dist.get_rank()
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    prepare, attend, cp = _attention_fn(args, device)

    def inputs(seq: int):
        gen = torch.Generator(device=device).manual_seed(0)  # the same sequence on every rank
        q = torch.randn(1, seq, args.heads, args.head_dim, generator=gen, device=device, dtype=dtype)
        k = torch.randn(1, seq, args.kv_heads, args.head_dim, generator=gen, device=device, dtype=dtype)
        v = torch.randn(1, seq, args.kv_heads, args.head_dim, generator=gen, device=device, dtype=dtype)
        return q, k, v, torch.randn_like(q)

    def run(q, k, v, dout):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        sync()
        t0 = time.perf_counter()
        out = attend(*leaves)
        sync()
        t1 = time.perf_counter()
        fwd_peak = probe.high()
        out.backward(dout)
        sync()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, fwd_peak

    probe = PeakCuda() if cuda else PeakRss()
    try:
        full = inputs(args.seq)
        if cp is not None:
            mesh, context_parallel = cp
            context = context_parallel(mesh, buffers=list(full), buffer_seq_dims=[1, 1, 1, 1])
        else:
            context = _nothing()
        with context:
            local = prepare(*full)
            run(*local)  # warm-up: thread pools, code pages and allocator caches are not the run's memory
            fwd, bwd, fwd_peaks, bwd_peaks = [], [], [], []
            for _ in range(args.repeats):
                dist.barrier()
                base = probe.reset()
                f, b, fwd_high = run(*local)
                fwd.append(f)
                bwd.append(b)
                fwd_peaks.append(fwd_high - base)
                bwd_peaks.append(probe.high() - base)
        mine = {"rank": rank, "fwd_s": statistics.median(fwd), "bwd_s": statistics.median(bwd),
                "fwd_mib": max(fwd_peaks) / MIB, "bwd_mib": max(bwd_peaks) / MIB}
    except Exception as exc:  # torch-cp on a backend it does not support: one line, not a traceback
        mine = {"rank": rank, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    finally:
        probe.close()
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        print("RESULT " + json.dumps({"cp": world, "device": device.type, "ranks": everyone}), flush=True)
    dist.destroy_process_group()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_config(args: argparse.Namespace, kind: str, cp: int, doc_len: int) -> dict:
    """Start one torchrun job and return rank 0's summary."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cp}", __file__, "--worker",
           f"--kind={kind}", f"--doc-len={doc_len}", f"--seq={args.seq}", f"--heads={args.heads}",
           f"--kv-heads={args.kv_heads}", f"--head-dim={args.head_dim}", f"--repeats={args.repeats}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // cp)), PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"cp": cp, "ranks": [{"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}]}
    return json.loads(lines[-1][len("RESULT "):])


# ------------------------------------------------------------------ work balance
def document_mixes(seq: int, rng: np.random.Generator) -> dict[str, tuple[int, ...]]:
    """Document boundaries of one packed sample under a few length mixes.

    * ``one document``: a single document fills the sample (plain causal);
    * ``web (lognormal)``: SlimPajama-like web text, median about 500 tokens, heavy tail;
    * ``long-upsampled``: the long-context recipe's mix, half the tokens from
      documents of 16K-256K tokens (upsampled), the rest web text;
    * ``books + chat``: a bimodal mix, most documents short conversations
      (median 300 tokens) and one in ten a book-length one (median 60K);
    * ``short (doc-len)``: equal short documents.
    """
    def pack(lengths):
        cu, total = [0], 0
        for n in lengths:
            total = min(seq, total + max(1, int(n)))
            if total > cu[-1]:
                cu.append(total)
            if total == seq:
                break
        if cu[-1] < seq:
            cu.append(seq)
        return tuple(cu)

    web = rng.lognormal(np.log(500), 1.2, size=seq)
    long = []
    while sum(long) < seq:
        long += [rng.integers(16_384, 262_144)] + list(rng.lognormal(np.log(500), 1.2, size=64))
    order = rng.permutation(len(long))
    bimodal = np.where(rng.random(seq) < 0.1, rng.lognormal(np.log(60_000), 0.8, size=seq),
                       rng.lognormal(np.log(300), 0.9, size=seq))
    return {"one document": (0, seq), "web (lognormal)": pack(web), "long-upsampled": pack(np.asarray(long)[order]),
            "books + chat": pack(bimodal)}


SEQUENCE, DOCUMENT = "sequence", "document"
"""The two layouts of ``Documents``: whole-sequence zigzag, per-document zigzag."""


def imbalance(cu: tuple[int, ...], ring: int, layout: str) -> float:
    """Max / mean work over ring ranks for one packed sample under ``layout`` (``sequence`` or ``document``).

    Work is the query-key pairs a rank attends (``Documents.rank_work``,
    equal to summing its blocks over the ring's steps); the busiest rank
    sets the step time when compute is the bottleneck.
    """
    work = Documents((cu,), layout).rank_work(ring)
    return float(work.max() / work.mean())


def masked_share(cu: tuple[int, ...]) -> float:
    """Query-key pairs under the document mask over those of plain causal attention (any layout, any R)."""
    seq = cu[-1]
    return float(Documents((cu,)).rank_work(1).sum() / (seq * (seq + 1) // 2))


# ------------------------------------------------------------------ CUDA kernel TFLOPS
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


# ------------------------------------------------------------------ main
def _row(name: str, result: dict, sdpa: dict | None) -> str:
    ranks = result["ranks"]
    errors = [r["error"] for r in ranks if "error" in r]
    if errors:
        return f"{name:<28}{result['cp']:>3}  cannot run here: {errors[0]}"
    fwd_mib, bwd_mib = max(r["fwd_mib"] for r in ranks), max(r["bwd_mib"] for r in ranks)
    fwd, bwd = max(r["fwd_s"] for r in ranks), max(r["bwd_s"] for r in ranks)
    vs = "" if sdpa is None else f"{fwd_mib / sdpa['fwd_mib']:>8.2f}{bwd_mib / sdpa['bwd_mib']:>8.2f}{(fwd + bwd) / sdpa['time']:>8.2f}"
    return f"{name:<28}{result['cp']:>3}{fwd_mib:>10.1f}{bwd_mib:>10.1f}{fwd:>9.3f}{bwd:>9.3f}{vs}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192, help="total tokens of the sequence (fixed across C)")
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4], help="ring sizes to run")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--doc-len", type=int, default=256, help="tokens per document in the masked runs")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--balance-seq", type=int, default=1 << 22, help="sample length of the work-balance table")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="ring", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    print(f"attention, {args.seq} tokens, {args.heads} q heads, {args.kv_heads} kv heads, head dim {args.head_dim}, "
          f"fwd+bwd, median of {args.repeats}, {'CUDA' if torch.cuda.is_available() else f'CPU ({os.cpu_count()} cores)'}; "
          f"memory: peak per rank above the inputs; x sdpa: ratios to plain SDPA (fwd MiB, bwd MiB, time)")
    print(f"{'':<28}{'C':>3}{'fwd MiB':>10}{'bwd MiB':>10}{'fwd s':>9}{'bwd s':>9}{'x sdpa':>24}")
    base = run_config(args, "sdpa", 1, 0)
    print(_row("sdpa (enable_gqa)", base, None), flush=True)
    sdpa = None
    if "error" not in base["ranks"][0]:
        r = base["ranks"][0]
        sdpa = {"fwd_mib": r["fwd_mib"], "bwd_mib": r["bwd_mib"], "time": r["fwd_s"] + r["bwd_s"]}
    cps = [c for c in args.cp if c > 1] or [2]
    print(_row("torch context_parallel", run_config(args, "torch-cp", cps[0], 0), sdpa), flush=True)
    for cp in args.cp:
        print(_row("ringleader causal", run_config(args, "ring", cp, 0), sdpa), flush=True)
        print(_row(f"ringleader docs of {args.doc_len}", run_config(args, "ring", cp, args.doc_len), sdpa), flush=True)

    rng = np.random.default_rng(0)
    mixes = document_mixes(args.balance_seq, rng)
    mixes[f"short ({args.doc_len})"] = _documents(args.balance_seq, args.doc_len).cu_seqlens[0]
    rings = [r for r in (2, 4, 8, 16, 32, 64, 128, 256) if args.balance_seq % (2 * r) == 0]
    print(f"\nwork per ring rank under document masks, {args.balance_seq:,}-token samples: busiest rank / mean rank "
          f"(1.00 = balanced), whole-sequence zigzag / per-document zigzag, side by side; "
          f"'masked' = attended pairs against plain causal attention")
    print(f"{'mix':<20}{'docs':>7}{'masked':>8}" + "".join(f"{f'R={r}':>13}" for r in rings))
    for name, cu in mixes.items():
        cells = "".join(f"{imbalance(cu, r, SEQUENCE):.2f}/{imbalance(cu, r, DOCUMENT):.3f}".rjust(13) for r in rings)
        print(f"{name:<20}{len(cu) - 1:>7}{masked_share(cu):>8.3f}{cells}", flush=True)
    if torch.cuda.is_available():
        kernel_tflops()
    else:
        print("\nblock kernel TFLOPS: skipped (no CUDA device; needs a GPU for Llama-3-8B shapes at 16K tokens per rank)")


if __name__ == "__main__":
    main()
