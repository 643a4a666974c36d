"""Timed transfers over torch.distributed: what one link, or one ring, really does.

The profiler measures with the transport training uses, so its numbers hold
for the traffic that follows: NCCL between GPUs, gloo between CPUs. Every
function here runs inside a process that has already joined a process group
(``join_group``), and times from the receiving side, which is the side that
knows when the bytes have arrived.

- ``transfer_seconds``: one direction, ``repeats`` messages, each timed from
  the receiver's "ready" to the last byte.
- ``ping_us``: one-way latency from small-message round trips.
- ``ring_step_seconds``: every rank sends a block to the next rank of its ring
  and receives one from the previous, as ring attention does each step.
- ``gpu_copy_matrix``: device-to-device copies inside one host.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from topology.profiling.listen import store_server

WARMUP = 1
"""Untimed transfers first: the first message pays for connection set-up and TCP slow start."""


def interface_of(ip: str) -> str | None:
    """The network interface that holds ``ip`` on this machine (``lo`` for any loopback address)."""
    import psutil

    if ipaddress.ip_address(ip).is_loopback:
        return "lo"
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    return None


def bind_to(ip: str) -> None:
    """Make gloo and NCCL use the interface of ``ip`` unless the user chose one.

    gloo otherwise binds to whatever the host name resolves to, which on a
    machine with several interfaces (or in a network namespace) is often not
    the interface the Ray node was started on.
    """
    iface = interface_of(ip)
    if iface:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)


def serve_store(ip: str, timeout_s: float) -> dist.TCPStore:
    """A rendezvous store on ``ip`` only, at a free port (``store.port``), for a new group to meet at."""
    return store_server(ip, timeout_s)


def join_group(store_or_addr: dist.Store | tuple[str, int], rank: int, world_size: int, backend: str, timeout_s: float) -> None:
    """Join the default process group through a store (or the ``(ip, port)`` of one)."""
    if isinstance(store_or_addr, tuple):
        host, port = store_or_addr
        store = dist.TCPStore(host, port, world_size, False, timeout=timedelta(seconds=timeout_s))
    else:
        store = store_or_addr
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _sync(device: torch.device) -> None:
    # NCCL calls return when queued on the stream; timing needs them finished.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def transfer_seconds(peer: int, nbytes: int, repeats: int, sending: bool, device: torch.device) -> list[float]:
    """Send (``sending``) or receive ``repeats`` messages of ``nbytes`` to/from ``peer``.

    Returns the receiver's time per message, from sending its one-element
    "ready" token to holding the whole message; the sender returns ``[]``.
    The token keeps messages apart, so each one is timed alone.
    """
    data = torch.empty(max(1, nbytes // 4), dtype=torch.float32, device=device)
    token = torch.zeros(1, device=device)
    times = []
    for i in range(WARMUP + repeats):
        if sending:
            dist.recv(token, peer)
            dist.send(data, peer)
            continue
        t0 = time.perf_counter()
        dist.send(token, peer)
        dist.recv(data, peer)
        _sync(device)
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    _sync(device)
    return times


def ping_us(peer: int, iters: int, first: bool, device: torch.device) -> float:
    """Median one-way latency in microseconds (half a round trip of a 4-byte message)."""
    token = torch.zeros(1, device=device)
    rtts = []
    for i in range(WARMUP + iters):
        t0 = time.perf_counter()
        if first:
            dist.send(token, peer)
            dist.recv(token, peer)
        else:
            dist.recv(token, peer)
            dist.send(token, peer)
        _sync(device)
        if i >= WARMUP:
            rtts.append(time.perf_counter() - t0)
    return 1e6 * sorted(rtts)[len(rtts) // 2] / 2


def ring_step_seconds(ring: list[int], nbytes: int, steps: int, device: torch.device) -> list[float]:
    """Time ``steps`` ring steps: this rank sends ``nbytes`` to the next rank of ``ring`` and receives from the previous.

    All rings of the world run at once, as they do in training, so links
    shared between rings are shared here too. Each step ends with a barrier
    over the world, so the time per step is the slowest hop's.

    Rings need two distinct ranks or more: gloo has no pair from a rank to
    itself, and a send to oneself fails deep inside it ("Pair is not connected").
    """
    if len(ring) < 2 or len(set(ring)) != len(ring):
        raise ValueError(f"ring {ring} must list at least two distinct ranks: a rank cannot send to itself over gloo")
    me = ring.index(dist.get_rank())
    nxt, prv = ring[(me + 1) % len(ring)], ring[(me - 1) % len(ring)]
    send = torch.empty(max(1, nbytes // 4), dtype=torch.float32, device=device)
    recv = torch.empty_like(send)
    times = []
    for i in range(WARMUP + steps):
        dist.barrier()
        t0 = time.perf_counter()
        for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, send, nxt), dist.P2POp(dist.irecv, recv, prv)]):
            work.wait()
        _sync(device)
        dist.barrier()
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    return times


def gpu_copy_matrix(nbytes: int, repeats: int) -> list[list[float]] | None:
    """GB/s of device-to-device copies between every pair of this host's GPUs; None with fewer than two."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return None
    n = torch.cuda.device_count()
    bufs = [torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{i}") for i in range(n)]
    matrix = [[0.0] * n for _ in range(n)]
    for a in range(n):
        for b in range(n):
            if a == b:
                continue
            times = []
            for i in range(WARMUP + repeats):
                torch.cuda.synchronize(a)
                torch.cuda.synchronize(b)
                t0 = time.perf_counter()
                bufs[b].copy_(bufs[a], non_blocking=True)
                torch.cuda.synchronize(a)
                torch.cuda.synchronize(b)
                if i >= WARMUP:
                    times.append(time.perf_counter() - t0)
            matrix[a][b] = nbytes / sorted(times)[len(times) // 2] / 1e9
    return matrix


def nvidia_smi_topo() -> str | None:
    """``nvidia-smi topo -m`` (how the GPUs, NICs and CPUs connect), when the tool is there."""
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30)
    return done.stdout if done.returncode == 0 else None
