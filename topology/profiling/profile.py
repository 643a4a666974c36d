"""Measure a Ray cluster's network: bandwidth and latency between every pair of hosts.

    import ray
    from topology.profiling.profile import profile_cluster
    ray.init(address="auto")
    data = profile_cluster(transfer_mb=64, repeats=5, cache_dir="~/.cache/ringleader")
    topo = Topology.from_measured(data)

One ``HostProbe`` actor runs on every alive node, pinned there with
``NodeAffinitySchedulingStrategy(soft=False)``. Host pairs are measured in
round-robin rounds (the circle method): each host is in at most one pair per
round, so n hosts take n - 1 rounds (n rounds when n is odd, one host
resting), and the pairs of a round run at the same time. Each pair forms its
own 2-rank torch.distributed group (NCCL when both hosts have CUDA, gloo
otherwise) through a store on the lower host's node IP. In a round, first
every pair's lower host sends to the higher one, then the other way (two
phases), so the flows that run together are on record: on an oversubscribed
fabric, pairs that cross the same uplink in one phase share it, and their
figures are their share of it (``meta["flows"]`` keeps every flow with its
round and phase).

Then each host's NIC capacity under concurrent flows: its two fastest
peers send to it at once (``nic_gbps``; a pair measured alone does not show
that two flows into one host share its link). Inside a host with several
GPUs, a device-to-device copy matrix is measured too, and ``nvidia-smi
topo -m`` is kept when the tool is there.

The result is the measured format of topology/network/model.py (``MEASURED_FORMAT``).
Hosts are named by node IP (``-2``, ``-3`` added when nodes share one) and
ordered by IP; their leaf comes from node labels (``topology.network.switches``)
or is inferred from the bandwidth matrix. Profiles are cached in
``cache_dir`` by the set of node ids, so the same cluster is measured once.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import median
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from topology.profiling import bandwidth
from topology.errors import ConfigError, first_line
from topology.files import dump_text, write_atomic
from topology.network.model import FORMAT_VERSION, MEASURED_FORMAT
from topology.network.switches import leaf_names

log = logging.getLogger("ringleader.profile")


class ProfileError(RuntimeError):
    """A measurement did not finish: a host died or two hosts cannot reach each other."""


def round_robin(n: int) -> list[list[tuple[int, int]]]:
    """Rounds in which every pair of ``n`` players meets exactly once, nobody twice in a round.

    The circle method: fix player 0, rotate the others one place per round,
    pair the i-th from the front with the i-th from the back. An odd ``n``
    gets a ghost player whose partner rests that round.

    Parameters
    ----------
    n : int
        Number of players (hosts), n >= 0.

    Returns
    -------
    list of rounds
        ``n - 1`` rounds for even ``n``, ``n`` for odd ``n`` > 1; each a list
        of ``(low, high)`` index pairs.

    Examples
    --------
    >>> round_robin(4)
    [[(0, 3), (1, 2)], [(0, 2), (1, 3)], [(0, 1), (2, 3)]]
    """
    if n < 2:
        return []
    m = n + (n % 2)
    others = list(range(1, m))
    rounds = []
    for _ in range(m - 1):
        seats = [0] + others
        pairs = [tuple(sorted((seats[i], seats[m - 1 - i]))) for i in range(m // 2)]
        rounds.append(sorted(p for p in pairs if p[1] < n))
        others = others[-1:] + others[:-1]
    return rounds


@ray.remote(num_cpus=0)
class HostProbe:
    """A process on one host that joins process groups and times transfers.

    The profiler runs one per host and pairs them up each round; a ring
    benchmark runs one per rank (``ring``).

    It asks Ray for no CPU or GPU so it fits beside whatever runs there; with
    no GPU requested, Ray leaves CUDA_VISIBLE_DEVICES alone and the probe sees
    every GPU of the host.
    """

    def __init__(self, ip: str, timeout_s: float) -> None:
        self.ip = ip
        self.timeout_s = timeout_s
        self.store = None
        self.device = None
        bandwidth.bind_to(ip)

    def info(self) -> dict[str, Any]:
        import torch

        return {"node_id": ray.get_runtime_context().get_node_id(),
                "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0}

    def listen(self) -> int:
        self.store = bandwidth.serve_store(self.ip, self.timeout_s)
        return self.store.port

    def join(self, rank: int, master: tuple[str, int], backend: str, world_size: int = 2) -> None:
        """Join a group whose rank 0 is the probe that ``listen``-ed at ``master``."""
        bandwidth.join_group(self.store if rank == 0 else tuple(master), rank, world_size, backend, self.timeout_s)
        self.device = bandwidth.device_for(backend)

    def transfer(self, sending: bool, nbytes: int, repeats: int) -> list[float]:
        return bandwidth.transfer_seconds(1 - _rank(), nbytes, repeats, sending, self.device)

    def ping(self, iters: int) -> float:
        return bandwidth.ping_us(1 - _rank(), iters, _rank() == 0, self.device)

    def ring(self, ring: list[int], nbytes: int, steps: int) -> list[float]:
        return bandwidth.ring_step_seconds(ring, nbytes, steps, self.device)

    def leave(self) -> None:
        bandwidth.leave_group()
        self.store = None

    def fan_in(self, nbytes: int, repeats: int) -> list[float]:
        return fan_in_seconds(nbytes, repeats, self.device)

    def gpus(self, nbytes: int, repeats: int) -> tuple[list[list[float]] | None, str | None]:
        return bandwidth.gpu_copy_matrix(nbytes, repeats), bandwidth.nvidia_smi_topo()


def fan_in_seconds(nbytes: int, repeats: int, device) -> list[float]:
    """Rank 0 receives ``nbytes`` from every other rank at once; its time per round (the others return ``[]``).

    What one NIC carries under concurrent flows: a pair measured alone can
    each reach the link's speed while two flows into one host share it.
    """
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    count = max(1, nbytes // 4)
    token = torch.zeros(1, device=device)
    bufs = [torch.empty(count, dtype=torch.float32, device=device) for _ in range(world - 1 if rank == 0 else 1)]
    times = []
    for i in range(bandwidth.WARMUP + repeats):
        if rank:
            dist.recv(token, 0)
            dist.send(bufs[0], 0)
            continue
        t0 = time.perf_counter()
        for peer in range(1, world):
            dist.send(token, peer)
        for work in [dist.irecv(buf, peer) for peer, buf in enumerate(bufs, start=1)]:
            work.wait()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= bandwidth.WARMUP:
            times.append(time.perf_counter() - t0)
    return times


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def cluster_hosts() -> list[dict[str, Any]]:
    """Alive Ray nodes as measured-format hosts, ordered by IP then node id, named by IP."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    nodes.sort(key=lambda n: (ipaddress.ip_address(n["NodeManagerAddress"]), n["NodeID"]))
    hosts, seen = [], {}
    for n in nodes:
        ip = n["NodeManagerAddress"]
        seen[ip] = seen.get(ip, 0) + 1
        hosts.append({
            "name": ip if seen[ip] == 1 else f"{ip}-{seen[ip]}",
            "node_id": n["NodeID"],
            "ip": ip,
            "labels": dict(n.get("Labels") or {}),
            "gpus": int(n.get("Resources", {}).get("GPU", 0)),
        })
    return hosts


def cache_key(node_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(node_ids)).encode()).hexdigest()[:16]


def profile_cluster(
    transfer_mb: float = 64.0,
    repeats: int = 5,
    cache_dir: str | os.PathLike | None = None,
    reprofile: bool = False,
    timeout_s: float = 300.0,
    latency_iters: int = 20,
    name: str = "ray-cluster",
) -> dict[str, Any]:
    """Profile the hosts of the Ray cluster this driver is connected to.

    Parameters
    ----------
    transfer_mb : float
        Size of each timed message, MiB. Large enough that it takes
        milliseconds on the fastest link.
    repeats : int
        Timed messages per direction; the median is reported.
    cache_dir : path, optional
        Where profiles are kept, keyed by the set of node ids; None keeps none.
    reprofile : bool
        Measure again even when a cached profile exists.
    timeout_s : float
        Longest wait for any one step (forming a group, one phase).

    Returns
    -------
    dict
        The measured topology (see ``topology.network.model.MEASURED_FORMAT``).

    Raises
    ------
    ConfigError
        Bad arguments, or no Ray connection.
    ProfileError
        A host died or a pair could not connect within ``timeout_s``.
    """
    if transfer_mb <= 0 or repeats < 1 or timeout_s <= 0:
        raise ConfigError(f"transfer_mb ({transfer_mb}), repeats ({repeats}) and timeout_s ({timeout_s}) must be positive")
    if not ray.is_initialized():
        raise ConfigError("profile_cluster needs a Ray connection; call ray.init(address=...) first")
    hosts = cluster_hosts()
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir).expanduser() / f"profile-{cache_key([h['node_id'] for h in hosts])}.json"
        if cache.is_file() and not reprofile:
            try:
                data = json.loads(cache.read_text())
                log.info("reusing the profile of these %d hosts in %s (--reprofile measures again)", len(hosts), cache)
                return data
            except json.JSONDecodeError:
                log.warning("cached profile %s is unreadable; measuring again", cache)
    data = _measure(hosts, int(transfer_mb * 2**20), repeats, timeout_s, latency_iters, name)
    data["meta"]["transfer_mb"] = transfer_mb
    if cache is not None:
        write_atomic(cache, dump_text(data, cache))
    return data


FAN_IN = 2
"""Peers that send to a host at once when its NIC capacity is measured."""
NIC_SLACK = 0.15
"""A fan-in this much slower than its slowest sender alone is still "each at its own rate" (measurement noise)."""


def _nic_capacity(probes: list, hosts: list[dict], bw: list[list[float]], backend: str, nbytes: int, repeats: int,
                  timeout_s: float) -> list[float | None]:
    """GB/s each host's NIC takes in from ``FAN_IN`` peers at once (its fastest senders), host by host.

    The NIC took in the fan-in's bytes over its time, and one sender's pair
    rate through it, so it carries at least the larger of the two. The
    fan-in lasts as long as its slowest transfer, though, and a sender whose
    own path is slow (another leaf, a degraded link) makes it long without
    the NIC holding anything back: when the fan-in took no longer than its
    slowest sender needs alone (within ``NIC_SLACK``), every flow ran at
    about its own rate, and the NIC is taken to carry their sum.

    None for every host when there are too few hosts to send at once.
    """
    n = len(hosts)
    if n <= FAN_IN:
        return [None] * n
    out: list[float | None] = []
    for x in range(n):
        peers = sorted((p for p in range(n) if p != x), key=lambda p: (-bw[p][x], p))[:FAN_IN]
        what = f"NIC capacity of {hosts[x]['name']}"
        port = _get([probes[x].listen.remote()], timeout_s, what)[0]
        group = [x, *peers]
        _get([probes[p].join.remote(rank, (hosts[x]["ip"], port), backend, len(group)) for rank, p in enumerate(group)], timeout_s, what)
        seconds = _get([probes[p].fan_in.remote(nbytes, repeats) for p in group], timeout_s, what)[0]
        _get([probes[p].leave.remote() for p in group], timeout_s, what)
        rates = [bw[p][x] for p in peers]
        took, alone = median(seconds), nbytes / (min(rates) * 1e9) if min(rates) > 0 else float("inf")
        unhindered = sum(rates) if took <= alone * (1 + NIC_SLACK) else 0.0
        out.append(max(FAN_IN * nbytes / took / 1e9, max(rates), unhindered))
    return out


def _get(refs: list, timeout_s: float, what: str) -> list:
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ProfileError(f"{what} did not finish within {timeout_s:g} s; check that the hosts reach each other on their node IPs") from None
    except ray.exceptions.RayError as exc:
        first = first_line(exc)
        raise ProfileError(f"{what} failed: {first}") from exc


def _measure(hosts: list[dict], nbytes: int, repeats: int, timeout_s: float, latency_iters: int, name: str) -> dict[str, Any]:
    start = time.monotonic()
    n = len(hosts)
    probes = [
        HostProbe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(h["node_id"], soft=False)).remote(h["ip"], timeout_s)
        for h in hosts
    ]
    try:
        infos = _get([p.info.remote() for p in probes], timeout_s, "starting a probe on every host")
        for h, info in zip(hosts, infos):
            if info["node_id"] != h["node_id"]:
                raise ProfileError(f"the probe for {h['name']} ran on node {info['node_id']}, not {h['node_id']}")
        backend = "nccl" if n and all(i["cuda_devices"] for i in infos) else "gloo"
        bw = [[0.0] * n for _ in range(n)]
        lat = [[0.0] * n for _ in range(n)]
        flows, round_s = [], []
        rounds = round_robin(n)
        names = [h["name"] for h in hosts]
        bar = tqdm(rounds, desc="profile", unit="round", disable=not sys.stderr.isatty())
        for r, pairs in enumerate(bar):
            t0 = time.monotonic()
            what = f"round {r + 1}/{len(rounds)} ({', '.join(names[a] + '-' + names[b] for a, b in pairs)})"
            ports = _get([probes[a].listen.remote() for a, _ in pairs], timeout_s, what)
            _get([probes[x].join.remote(rank, (hosts[a]["ip"], port), backend)
                  for (a, b), port in zip(pairs, ports) for rank, x in enumerate((a, b))], timeout_s, what)
            for phase in (0, 1):
                refs = []
                for a, b in pairs:
                    src, dst = (a, b) if phase == 0 else (b, a)
                    refs.append(probes[dst].transfer.remote(False, nbytes, repeats))
                    refs.append(probes[src].transfer.remote(True, nbytes, repeats))
                times = _get(refs, timeout_s, what)[::2]
                for (a, b), seconds in zip(pairs, times):
                    src, dst = (a, b) if phase == 0 else (b, a)
                    bw[src][dst] = nbytes / median(seconds) / 1e9
                    flows.append({"round": r, "phase": phase, "src": src, "dst": dst, "gbps": bw[src][dst], "seconds": seconds})
            pings = _get([probes[x].ping.remote(latency_iters) for a, b in pairs for x in (a, b)], timeout_s, what)[::2]
            for (a, b), us in zip(pairs, pings):
                lat[a][b] = lat[b][a] = us
            _get([probes[x].leave.remote() for a, b in pairs for x in (a, b)], timeout_s, what)
            round_s.append(time.monotonic() - t0)
            slowest = min((bw[a][b] for a, b in pairs), default=0.0)
            if bar.disable:
                log.info("profile %s: %.1f s, slowest pair %.3g GB/s", what, round_s[-1], slowest)
        nic = _nic_capacity(probes, hosts, bw, backend, nbytes, repeats, timeout_s)
        gpu_results = _get([p.gpus.remote(min(nbytes, 256 * 2**20), repeats) for p in probes], timeout_s, "GPU copy matrices")
    finally:
        for p in probes:
            ray.kill(p)
    leaves, leaf_source = leaf_names(bw, [h["labels"] for h in hosts], lat)
    for h, leaf, cap in zip(hosts, leaves, nic):
        h["leaf"] = leaf
        if cap is not None:
            h["nic_gbps"] = cap
    return {
        "format": MEASURED_FORMAT,
        "version": FORMAT_VERSION,
        "name": name,
        "hosts": hosts,
        "host_bw_gbps": bw,
        "host_lat_us": lat,
        "gpu_bw_gbps": {h["name"]: m for h, (m, _) in zip(hosts, gpu_results) if m is not None},
        "meta": {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "backend": backend,
            "transfer_bytes": nbytes,
            "repeats": repeats,
            "latency_iters": latency_iters,
            "rounds": [[list(p) for p in pairs] for pairs in rounds],
            "round_s": round_s,
            "duration_s": time.monotonic() - start,
            "flows": flows,
            "leaf_source": leaf_source,
            "nvidia_smi_topo": {h["name"]: t for h, (_, t) in zip(hosts, gpu_results) if t},
        },
    }
