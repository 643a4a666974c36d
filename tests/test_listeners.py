"""Sockets the project opens listen on the node's cluster address, never on every interface.

Two Ray nodes on this machine (127.0.0.2, 127.0.0.3). The listeners a
process holds are read from the kernel (psutil) before and after the rank
rendezvous and the profiler's store start; what appears in between is the
project's. Ray's own core-worker port, open from the worker's first moment,
is Ray's (and behind its token authentication when that is on).
"""

from __future__ import annotations

import ipaddress
import os
import socket

import psutil
import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from launcher.runtime.workers import WorkerGroup
from tests.ray_utils import local_cluster
from topology.profiling.listen import bound_socket, store_server
from topology.planning.plan import Plan, RankPlacement
from topology.profiling.profile import HostProbe


def listeners(pid: int) -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN}


def wildcard(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_unspecified


def test_store_server_listens_on_its_address_only():
    store = store_server("127.0.0.5", timeout_s=10)
    try:
        mine = listeners(os.getpid())
        assert ("127.0.0.5", store.port) in mine
        assert not any(port == store.port and ip != "127.0.0.5" for ip, port in mine)
        with socket.create_connection(("127.0.0.5", store.port), timeout=5):
            pass
        with pytest.raises(OSError):  # same port, another loopback address: nobody there
            socket.create_connection(("127.0.0.6", store.port), timeout=5).close()
    finally:
        del store


def test_bound_socket_ports_never_collide():
    socks = [bound_socket("127.0.0.5") for _ in range(20)]
    try:
        assert len({s.getsockname()[1] for s in socks}) == 20  # the kernel hands out each port once
    finally:
        for s in socks:
            s.close()


@pytest.mark.ray
def test_no_project_listener_on_a_wildcard_address_across_nodes():
    with local_cluster(hosts=2, gpus_per_host=1, cpus_per_host=2) as lc:
        placements = [RankPlacement(r, f"h{r}", 0, lc.node_id(r), lc.ips[r]) for r in range(2)]
        plan = Plan("hand", 1, 2, 1, 32, placements)
        probes = [HostProbe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(lc.node_id(i), soft=False)).remote(lc.ips[i], 30)
                  for i in range(2)]
        probe_pids = ray.get([p.__ray_call__.remote(lambda self: os.getpid()) for p in probes], timeout=60)
        before = {pid: listeners(pid) for pid in probe_pids}
        group = WorkerGroup.start(plan, [p.node_id for p in placements], {"CPU": 1.0, "GPU": 1.0}, timeout_s=60)
        try:
            pids = [d["pid"] for d in ray.get([w.describe.remote() for w in group.workers], timeout=60)]
            # The rendezvous store is up (start() published MASTER_PORT), on rank 0's node address only.
            master = (group.envs[0]["MASTER_ADDR"], int(group.envs[0]["MASTER_PORT"]))
            assert master[0] == lc.ips[0] and master in listeners(pids[0])
            assert not any(p == master[1] and ip != master[0] for ip, p in listeners(pids[0]))
            before |= {pid: listeners(pid) for pid in pids}
            # Until now each process holds Ray's core-worker port (all interfaces, Ray's own) and, on rank 0, the store.
            assert all(len([a for a in addrs if wildcard(a[0])]) == 1 for addrs in before.values()), before
            group.init_process_group(timeout_s=60)
            port = ray.get(probes[0].listen.remote(), timeout=60)
            ray.get([probes[i].join.remote(i, (lc.ips[0], port), "gloo") for i in range(2)], timeout=60)
            assert (lc.ips[0], port) in listeners(probe_pids[0])
            opened = {pid: listeners(pid) - before[pid] for pid in before}
            assert all(opened.values()), f"expected the stores' and gloo's listeners in every process: {opened}"
            bad = {pid: sorted(a for a in addrs if wildcard(a[0])) for pid, addrs in opened.items()}
            assert not any(bad.values()), f"listening on every interface: {bad}"
            ray.get([p.leave.remote() for p in probes], timeout=60)
        finally:
            group.shutdown()
