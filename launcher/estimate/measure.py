"""What one rank measures for a calibration, with the code paths training uses.

Every function runs inside a rank that has joined a torch.distributed group
(gloo on CPUs, NCCL on GPUs) and is called on every rank at once, so each
figure is taken under the load of all ranks working together, as in a step:

- ``gemm_tflops``: the model's projection and MLP matmuls at a stage's tokens per rank;
- ``dense_tflops``: the recipe's own model, forward and backward with attention left out,
  at a stage's tokens per rank: matmuls and every per-token operation around them;
- ``attention_tflops``: ``trainer.attention.ring_attention``'s block kernels, forward
  and backward, at a ring step's block size: a full block, and the causal block of a ring's step 0;
- ``ring_hops``: every rank sends a K/V-sized block to the next rank of one ring
  at once (``topology.profiling.bandwidth.ring_step_seconds``), split by in-host / host-to-host hop;
- ``bus_gbps``: all-reduce and reduce-scatter bus bandwidth (NCCL tests' busbw);
- ``all_to_all_seconds``: one all-to-all of a tiny message (the Ulysses exchange's latency);
- ``step_overhead_s``: a DeepSpeed ZeRO step of the model on 16 tokens, whose compute is negligible.

Each returns samples; ``topology.calibration.Figure`` ranges are taken over
ranks and repeats (``figure``).
"""

from __future__ import annotations

import time
from statistics import median
from typing import Any

import torch
import torch.distributed as dist

from topology.profiling import bandwidth
from topology.calibration import Figure


LOCAL_SECONDS = 0.5
"""A rank-local measurement (a kernel, the dense layers) repeats until it has run this long: on a
shared machine a few repeats of a millisecond kernel read whatever burst of load they met
(3 repeats gave backward rates 5x apart within a minute here)."""
MAX_REPEATS = 200


def _timed(fn: Any, repeats: int, device: torch.device, min_s: float = 0.0) -> list[float]:
    """Seconds of ``repeats`` calls after a warm-up one, and more (up to ``MAX_REPEATS``) until they add up to ``min_s``.

    ``min_s`` only for work without collectives: ranks may then call ``fn`` a different number of times.
    """
    fn()  # warm-up: allocation, kernel selection
    out: list[float] = []
    while len(out) < repeats or (sum(out) < min_s and len(out) < MAX_REPEATS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(time.perf_counter() - t0)
    return out


def gemm_tflops(tokens: int, hidden: int, intermediate: int, device: torch.device, dtype: torch.dtype,
                repeats: int = 5) -> list[float]:
    """TFLOPS of one layer's matmuls (q/k/v/o projections and the gated MLP) on ``tokens`` rows."""
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    w_attn = torch.randn(hidden, hidden, device=device, dtype=dtype)
    w_up = torch.randn(hidden, 2 * intermediate, device=device, dtype=dtype)
    w_down = torch.randn(intermediate, hidden, device=device, dtype=dtype)

    def layer() -> None:
        for _ in range(4):
            x @ w_attn
        up = x @ w_up
        up[:, :intermediate] @ w_down

    flops = 2 * tokens * hidden * (4 * hidden + 3 * intermediate)
    return [flops / s / 1e12 for s in _timed(layer, repeats, device, LOCAL_SECONDS)]


def dense_tflops(model_cfg: dict[str, Any], params: int, tokens: int, device: torch.device, dtype: torch.dtype,
                 repeats: int = 5) -> list[float]:
    """Marginal TFLOPS of the model's work outside attention, counted as the cost model counts it (``6 * params * tokens``).

    The recipe's model (``trainer.model.llama.build_model``) runs forward and
    backward through the trainer's loss (``trainer.model.loss.shard_loss_sum``) with
    an attention that passes the queries through, so norms, RoPE, the MLP's
    activation, residual adds and the loss head are timed with the matmuls.
    On small models they cost more than the matmuls; a GEMM alone would miss them.
    The rate is the slope between ``SMALL_TOKENS`` and ``tokens``: the cost of
    each further token. What a step pays regardless of its tokens (a kernel
    launch and Python per operation) is the step's fixed cost, measured apart.
    """
    from transformers import AttentionInterface

    from trainer.config import ModelConfig
    from trainer.model.loss import shard_loss_sum
    from trainer.model.llama import build_model
    from trainer.tokenizer import load_tokenizer

    def no_attention(module, query, key, value, attention_mask, **kwargs):
        return query.transpose(1, 2), None

    AttentionInterface.register("ringleader_no_attention", no_attention)
    mc = ModelConfig(**model_cfg)
    torch.manual_seed(0)
    model = build_model(mc, mc.base_theta, tokens, tokenizer=load_tokenizer(mc, None), dtype=dtype).to(device)
    model.set_attn_implementation("ringleader_no_attention")
    model.config.use_cache = False
    def step(n: int):
        ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)
        positions = torch.arange(n, device=device)[None]

        def run() -> None:
            loss, _ = shard_loss_sum(model, ids, positions, ids)
            loss.backward()
        return run

    small = min(SMALL_TOKENS, tokens // 2)
    small_s = _timed(step(small), repeats, device, LOCAL_SECONDS / 2)
    fixed = sum(small_s) / len(small_s)  # the expected cost, stalls included (see ``figure``)
    timed = _timed(step(tokens), repeats, device, LOCAL_SECONDS)
    return [6 * params * (tokens - small) / (s - fixed) / 1e12 for s in timed if s > fixed]


SMALL_TOKENS = 16
"""Tokens of a step whose compute is negligible: the fixed cost of the model's operations."""


def attention_tflops(block: int, n_q: int, n_kv: int, head_dim: int, device: torch.device, dtype: torch.dtype,
                     repeats: int = 5, causal: bool = False) -> tuple[list[float], list[float]]:
    """(forward, backward) TFLOPS of the ring's block kernel on a ``block`` x ``block`` step.

    FLOPs as the cost model counts them: ``4 * block^2 * n_q * d`` forward, 2.5 x that backward;
    half of that for a ``causal`` block (the diagonal one of a ring's step 0), whatever the kernel
    really spends on it: how much of the masked half a kernel skips differs (CPU flash kernels skip
    little), and the achieved rate says it.
    """
    from trainer.attention.ring_attention import block_backward, block_forward

    q = torch.randn(1, n_q, block, head_dim, device=device, dtype=dtype)
    k = torch.randn(1, n_kv, block, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    scale = head_dim ** -0.5
    out, lse = block_forward(q, k, v, causal, scale)
    dout = torch.randn_like(out)
    flops = 4 * block * block * n_q * head_dim * (0.5 if causal else 1.0)
    fwd = _timed(lambda: block_forward(q, k, v, causal, scale), repeats, device, LOCAL_SECONDS)
    bwd = _timed(lambda: block_backward(dout, q, k, v, out, lse, causal, scale), repeats, device, LOCAL_SECONDS)
    return [flops / s / 1e12 for s in fwd], [2.5 * flops / s / 1e12 for s in bwd]


HOP_MIN_BYTES = 4 << 20
"""Ring hops are timed with at least this many bytes: smaller transfers time mostly the exchange's fixed cost."""


def ring_hops(hosts: list[str], nbytes: int, steps: int, device: torch.device) -> dict[str, list[float]]:
    """Marginal GB/s of this rank's incoming hop with all ranks in one ring sending at once, keyed ``intra``/``inter``.

    ``hosts`` is every rank's host, rank order; the ring is rank order. Each
    hop is timed with ``max(nbytes, HOP_MIN_BYTES)`` bytes and with 64 bytes,
    the same way (``topology.profiling.bandwidth.ring_step_seconds``), and the rate is
    the extra bytes over the extra time: what one more byte costs. The cost
    model prices the fixed part of every exchange apart (``p2p_latency_s``,
    once per exchange), so a rate that kept it would count it twice: on 4
    gloo ranks sharing 2 cores a 64 KiB hop "ran at" 0.014 GB/s, nearly all
    of it the exchange's fixed cost.
    """
    world, me = dist.get_world_size(), dist.get_rank()
    if world < 2:
        return {}
    ring, size, steps = list(range(world)), max(nbytes, HOP_MIN_BYTES), max(steps, 5)
    base = bandwidth.ring_step_seconds(ring, 64, steps, device)
    seconds = bandwidth.ring_step_seconds(ring, size, steps, device)
    # The fixed cost is the quickest 64-byte exchange: a stall only ever adds time, and with the median a few
    # stalled small exchanges (2 loaded cores) set it above every large hop's time, leaving no rate at all.
    fixed = min(base)
    kind = "intra" if hosts[(me - 1) % world] == hosts[me] else "inter"
    return {kind: [(size - 64) / (s - fixed) / 1e9 for s in seconds if s > fixed]}


def overlap_fraction(block: int, n_q: int, n_kv: int, head_dim: int, nbytes: int, device: torch.device, dtype: torch.dtype,
                     repeats: int = 5) -> list[float]:
    """How much of a ring step's shorter part hides behind the longer: block kernel and K/V send timed apart, then together.

    ``(t_comm + t_comp - t_both) / min(t_comm, t_comp)``, clipped to [0, 1]: 1 when the transfer
    runs while the kernel computes (NCCL on its own stream), 0 when they take turns on the same cores.
    """
    from trainer.attention.ring_attention import block_forward

    world, me = dist.get_world_size(), dist.get_rank()
    if world < 2:
        return []
    nxt, prv = (me + 1) % world, (me - 1) % world
    q = torch.randn(1, n_q, block, head_dim, device=device, dtype=dtype)
    k = torch.randn(1, n_kv, block, head_dim, device=device, dtype=dtype)
    send = torch.empty(max(1, nbytes // 4), dtype=torch.float32, device=device)
    recv = torch.empty_like(send)

    def ops() -> list:
        return dist.batch_isend_irecv([dist.P2POp(dist.isend, send, nxt), dist.P2POp(dist.irecv, recv, prv)])

    def comm() -> None:
        for w in ops():
            w.wait()

    def comp() -> None:
        block_forward(q, k, k, False, head_dim ** -0.5)

    def both() -> None:
        works = ops()
        comp()
        for w in works:
            w.wait()

    out = []
    for _ in range(repeats):
        t = []
        for fn in (comm, comp, both):
            dist.barrier()
            t += _timed(fn, 1, device)
        shorter = min(t[0], t[1])
        out.append(min(1.0, max(0.0, (t[0] + t[1] - t[2]) / shorter)) if shorter > 0 else 1.0)
    return out


def bus_gbps(nbytes: int, repeats: int, device: torch.device) -> list[float]:
    """Bus bandwidth of all-reduce and reduce-scatter: algbw x 2(n-1)/n and x (n-1)/n (NCCL tests' busbw)."""
    n = dist.get_world_size()
    if n < 2:
        return []
    numel = max(n, nbytes // 4 // n * n)
    x = torch.ones(numel, device=device)
    out = torch.empty(numel // n, device=device)
    ar = _timed(lambda: (dist.all_reduce(x), dist.barrier()), repeats, device)
    rs = _timed(lambda: (dist.reduce_scatter_tensor(out, x), dist.barrier()), repeats, device)
    size = numel * 4
    return [size / s / 1e9 * 2 * (n - 1) / n for s in ar] + [size / s / 1e9 * (n - 1) / n for s in rs]


def _back_to_back(fn: Any, calls: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds per call of ``calls`` calls in a row, all ranks starting together: a collective's latency as a
    layer pays it, without the barrier a single timed call would add."""
    out = []
    fn()
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append((time.perf_counter() - t0) / calls)
    return out


def exchange_seconds(nbytes: int, repeats: int, device: torch.device, calls: int = 50) -> list[float]:
    """Seconds of one ring exchange (send to the next rank, receive from the previous, ``RingComm``'s pattern), all ranks at once."""
    world, me = dist.get_world_size(), dist.get_rank()
    if world < 2:
        return []
    send = torch.zeros(max(1, nbytes // 4), device=device)
    recv = torch.empty_like(send)

    def exchange() -> None:
        ops = [dist.P2POp(dist.isend, send, (me + 1) % world), dist.P2POp(dist.irecv, recv, (me - 1) % world)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    return _back_to_back(exchange, calls, repeats, device)


def all_to_all_seconds(nbytes: int, repeats: int, device: torch.device, calls: int = 50) -> list[float]:
    """Seconds of one ``all_to_all_single`` of ``nbytes`` per rank over all ranks (as ``trainer.attention.ulysses`` calls it)."""
    n = dist.get_world_size()
    if n < 2:
        return []
    x = torch.zeros(max(n, nbytes // 4 // n * n), device=device)
    y = torch.empty_like(x)
    return _back_to_back(lambda: dist.all_to_all_single(y, x), calls, repeats, device)


SMALL_MODEL = 1_000_000_000
"""Models up to this many parameters are stepped as themselves; larger ones as an MLP of their width."""


def step_overhead_s(hidden: int, layers: int, device: torch.device, zero_stage: int = 3, repeats: int = 5,
                    model_cfg: dict[str, Any] | None = None, params: int = 0) -> list[float]:
    """Seconds of a DeepSpeed ZeRO step (forward, backward, optimizer) on 16 tokens per rank.

    At 16 tokens the compute is negligible, so what is left is the fixed work
    of every step: parameter gathers, gradient reduction, the optimizer, the
    model's per-layer Python and launches, engine bookkeeping. The recipe's
    own model (``model_cfg``, built by ``trainer.model.llama.build_model``) is
    stepped when it has at most ``SMALL_MODEL`` parameters; a larger one is
    stood in for by an MLP of its width and depth.
    """
    from trainer.engine import import_deepspeed

    deepspeed = import_deepspeed()
    torch.manual_seed(0)
    hf = model_cfg is not None and 0 < params <= SMALL_MODEL
    if hf:
        from trainer.config import ModelConfig
        from trainer.model.llama import build_model
        from trainer.tokenizer import load_tokenizer

        mc = ModelConfig(**model_cfg)
        model = build_model(mc, mc.base_theta, 16, tokenizer=load_tokenizer(mc, None)).to(device)
    else:
        model = torch.nn.Sequential(*[torch.nn.Linear(hidden, hidden) for _ in range(layers)]).to(device)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}},
              "zero_optimization": {"stage": zero_stage}, "gradient_clipping": 1.0, "steps_per_print": 10**9}
    if device.type == "cuda":
        config["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config,
                                      dist_init_required=False)
    if hf:
        ids = torch.randint(0, model.config.vocab_size, (1, 16), device=device)

        def forward() -> torch.Tensor:
            return engine(input_ids=ids, labels=ids).loss
    else:
        x = torch.randn(1, hidden, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)

        def forward() -> torch.Tensor:
            return engine(x).float().sum()

    def step() -> None:
        loss = forward()
        engine.backward(loss)
        engine.step()

    try:
        return _timed(step, repeats, device)
    finally:
        engine.destroy()


def figure(samples: list[float], source: str, kind: str = "median") -> Figure | None:
    """A figure of ``samples`` with their 10th-90th percentile range; None when there are none.

    ``kind`` says what the expected value is. ``"rate"``: samples are rates of
    equal work, and the expected rate is their harmonic mean, the total work
    over the total time. ``"seconds"``: the arithmetic mean, the expected
    time. ``"median"``: the median. A rank that shares its core with others
    (more ranks than cores, or a neighbour process) runs most short samples
    at full speed and a few stalled for a whole scheduler time slice; the
    median then reads the unshared speed, while a step, long enough to meet
    its share of the stalls, runs at the mean one.
    """
    if not samples:
        return None
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]  # noqa: E731
    if kind == "rate":
        value = len(s) / sum(1.0 / v for v in s) if all(v > 0 for v in s) else median(s)
    elif kind == "seconds":
        value = sum(s) / len(s)
    elif kind == "median":
        value = median(s)
    else:
        raise ValueError(kind)
    return Figure(value, min(pick(0.1), value), max(pick(0.9), value), source)
