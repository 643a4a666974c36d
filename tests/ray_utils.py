"""Multi-node Ray on one machine, for tests and benchmarks.

``local_cluster`` gives a ``ray.cluster_utils.Cluster`` whose nodes have
distinct loopback IPs (127.0.0.2, 127.0.0.3, ...) and fake GPUs, with the
driver connected and everything torn down afterwards::

    with local_cluster(hosts=4, gpus_per_host=2) as lc:
        ray.nodes()            # 4 alive nodes, 8 GPUs
        lc.remove_host(3)      # a host dies

``when_step_reached`` injects such a fault once a stage has logged a given
step (after a checkpoint), while the controller runs the stage.

``RayHead`` runs ``ray start --head`` with its own ports and temp dir (for
``ray job submit`` and autoscaler tests) and stops exactly the processes
of that head, never another Ray on the machine.

127.0.0.1 is avoided on purpose: Ray rewrites it to the machine's outward
address when a driver connects, and a GCS bound to loopback is then unreachable.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int, exclude: set[int] = frozenset()) -> list[int]:
    """``count`` different TCP ports nobody listens on right now, none of them in ``exclude``.

    They are bound all at once, so no two are the same: one Ray head takes six, and two equal ones let its
    metrics exporter answer the raylet's requests to the runtime-env agent (HTTP 405, the job fails to start).
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket()
            held.append(s)
            s.bind(("", 0))
            if s.getsockname()[1] not in exclude:
                ports.append(s.getsockname()[1])
    finally:
        for s in held:
            s.close()
    return ports


@dataclass
class LocalCluster:
    """A connected ``ray.cluster_utils.Cluster``; ``nodes[i]`` has IP ``ips[i]``."""

    cluster: Any
    nodes: list[Any]
    ips: list[str]

    @property
    def address(self) -> str:
        return self.cluster.address

    def node_id(self, i: int) -> str:
        return self.nodes[i].node_id

    def remove_host(self, i: int) -> None:
        """Kill host ``i`` (not the head, which the driver is attached to)."""
        if i == 0:
            raise ValueError("host 0 is the head node the driver is attached to")
        remove_node(self.cluster, self.nodes[i])

    def add_host(self, gpus: int = 0, cpus: int = 2, labels: dict[str, str] | None = None) -> str:
        """Start one more host at the next free IP; returns its IP."""
        ip = f"127.0.0.{len(self.ips) + 2}"
        node = self.cluster.add_node(num_cpus=cpus, num_gpus=gpus, node_ip_address=ip, labels=labels or {})
        self.nodes.append(node)
        self.ips.append(ip)
        return ip


@contextlib.contextmanager
def local_cluster(
    hosts: int = 2,
    gpus_per_host: int = 2,
    cpus_per_host: int = 2,
    labels: list[dict[str, str]] | None = None,
    connect: bool = True,
    system_config: dict[str, Any] | None = None,
) -> Iterator[LocalCluster]:
    """``hosts`` Ray nodes at 127.0.0.2.. with fake GPUs; the driver connects to the first.

    Parameters
    ----------
    hosts : number of nodes, the head included (the head is a GPU host too).
    gpus_per_host, cpus_per_host : logical resources of each node.
    labels : Ray node labels per host (e.g. ``{"ringleader/leaf": "leaf0"}``).
    connect : call ``ray.init`` on the head (with the head's IP as the driver's).
    system_config : Ray's internal settings for the head, e.g. faster health checks.
    """
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster()
    lc = LocalCluster(cluster, [], [])
    try:
        for i in range(hosts):
            ip = f"127.0.0.{i + 2}"
            extra = {"include_dashboard": False, "_system_config": system_config or {}} if i == 0 else {}
            node = cluster.add_node(
                num_cpus=cpus_per_host, num_gpus=gpus_per_host, node_ip_address=ip,
                labels=(labels[i] if labels else {}), **extra,
            )
            lc.nodes.append(node)
            lc.ips.append(ip)
        cluster.wait_for_nodes()
        if connect:
            ray.init(address=cluster.address, _node_ip_address=lc.ips[0], logging_level="warning")
        yield lc
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for node in list(cluster.worker_nodes):
            remove_node(cluster, node)
        if cluster.head_node is not None:
            remove_node(cluster, cluster.head_node)
        cluster.shutdown()


def remove_node(cluster: Any, node: Any) -> None:
    """Kill a node outright, with the processes its raylet started.

    A graceful stop waits on every worker process of the node. Killed
    outright, the raylet leaves its agents (dashboard, runtime env) behind,
    polling for minutes on a machine the next tests need: they go too.
    """
    import psutil

    children = []
    for infos in node.all_processes.values():
        for info in infos:
            with contextlib.suppress(psutil.Error):
                children += psutil.Process(info.process.pid).children(recursive=True)
    cluster.remove_node(node, allow_graceful=False)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()


@contextlib.contextmanager
def when_step_reached(stage_dir: str | Path, at: int, act: Callable[[int], dict[str, Any]],
                      poll_s: float = 0.05) -> Iterator[dict[str, Any]]:
    """While the body runs, do ``act`` once the stage in ``stage_dir`` has logged step ``at`` (a fault injected mid-stage).

    A thread polls the stage's metrics.jsonl (rank 0's steps; ``stage_dir``
    is a path, or the local working copy of an object store stage) and calls
    ``act(step)`` with the highest step once it reaches ``at``; the dict it
    returns is what the context yields (empty if the body ended first). The
    thread is stopped and joined when the body ends, however it ends.
    """
    from launcher.runtime.rundir import read_metrics

    done: dict[str, Any] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            steps = [m["step"] for m in read_metrics(stage_dir) if "step" in m]
            if steps and max(steps) >= at:
                done.update(act(max(steps)))
                return
            stop.wait(poll_s)

    thread = threading.Thread(target=watch, name="fault-injector", daemon=True)
    thread.start()
    try:
        yield done
    finally:
        stop.set()
        thread.join(timeout=30)


@dataclass
class RayHead:
    """A ``ray start --head`` of our own: private temp dir, ports and processes."""

    temp_dir: Path
    port: int
    dashboard_port: int
    env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """GCS address, for ``ray.init`` and ``ringleader run --address``."""
        return f"{_outward_ip()}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """Jobs API address, for ``ray job submit --address``."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @classmethod
    def start(cls, *args: str, env: dict[str, str] | None = None, port: int | None = None, timeout: float = 90) -> "RayHead":
        """Start a head; ``args`` are extra ``ray start`` flags (e.g. ``--num-cpus=4``)."""
        # Unix socket paths under the temp dir must stay below ~100 characters.
        temp_dir = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))
        port = port or free_port()
        dashboard, client, agent, agent_grpc, metrics, runtime_env = free_ports(6, exclude={port})
        head = cls(temp_dir, port, dashboard, dict(os.environ, **(env or {})))
        head.env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Ray 2.60 turns token auth on for a head whenever ~/.ray/auth_token exists, but
        # `ray job submit` sends the token only under RAY_AUTH_MODE=token; a private
        # test head on this machine runs without auth so that every client agrees.
        head.env.setdefault("RAY_AUTH_MODE", "disabled")
        cmd = [
            _ray_cli(), "start", "--head",
            f"--port={head.port}", f"--dashboard-port={head.dashboard_port}", "--dashboard-host=127.0.0.1",
            "--include-dashboard=true", f"--temp-dir={temp_dir}", f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
            "--disable-usage-stats", *args,
        ]
        try:
            subprocess.run(cmd, env=head.env, check=True, capture_output=True, text=True, timeout=timeout)
            head.wait_for_dashboard(timeout)
        except BaseException:
            head.stop()
            raise
        return head

    def wait_for_dashboard(self, timeout: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # it answered, if only to say the request lacks a token
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Ray dashboard at {self.dashboard_url} did not answer in {timeout:.0f} s")
                time.sleep(0.5)

    def pids(self) -> list[int]:
        """Processes of this head and of any node it started: their command line names our temp dir."""
        needle = str(self.temp_dir).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if needle in (entry / "cmdline").read_bytes():
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found

    def stop(self, grace: float = 5.0) -> None:
        """Kill this head's processes (by pid) and remove its temp dir."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while pids and time.monotonic() < deadline:
                pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
                time.sleep(0.2)
            if not pids:
                break
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _ray_cli() -> str:
    """The ``ray`` command of the Python running the tests."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else "ray"


def _outward_ip() -> str:
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def ray_job_submit(head: RayHead, entrypoint: list[str], working_dir: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real ``ray job submit`` CLI, waiting for the job to finish."""
    cmd = [_ray_cli(), "job", "submit", "--address", head.dashboard_url,
           "--working-dir", str(working_dir), "--", *entrypoint]
    return subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=timeout)
