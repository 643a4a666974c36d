"""An emulated cluster network on one machine: hosts in network namespaces,
shaped links, and a Ray node on every host.

    python -m tests.netlab up                      # 6 hosts, 2 leaves of 3, 400/200 Mbit/s
    python -m tests.netlab up --degrade h3=300 --topology lab.yaml
    python -m tests.netlab down                    # remove labs a killed process left behind

``up`` prints the head's address and a command to run inside the lab, and
tears everything down on Ctrl-C. In Python::

    with NetLab(lab_topology()) as lab:
        lab.run(["python", "-m", "launcher", "profile", "--address", lab.address])

Layout. Namespace ``<prefix>-fab`` holds the switches: one bridge per leaf and
one ``spine`` bridge. Each host is a namespace ``<prefix>-<host>`` whose
``eth0`` (198.18.0.N/15) is a veth pair with port ``<host>`` on its leaf
bridge; each leaf reaches the spine through a veth pair ``up<K>`` (on the leaf)
- ``sp<K>`` (on the spine). ``tc tbf`` shapes the egress of all four ends, so
both directions of every host link and uplink run at their set rate. Nothing
is attached to the machine's own namespace: traffic only ever goes between
the lab's addresses.

The lab is described by the node/link topology form (topology/network/model.py):
hosts with one NIC each linked to a leaf (host link), leaves linked to one
spine (uplink); ``bw_gbps`` is GB/s per direction (400 Mbit/s = 0.05).
"""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from topology.errors import ConfigError
from topology.network.model import Topology

PREFIX = "rlab-"
"""Every namespace and temp dir this lab makes starts with it; ``down`` only touches those."""
SUBNET = ipaddress.ip_network("198.18.0.0/15")
"""The benchmarking range (RFC 2544): never routed, so lab traffic cannot leak."""
HEAD_PORT = 6379
DASHBOARD_PORT = 8265
TBF_LATENCY = "100ms"
"""Room for 100 ms of queue keeps tbf within 5% of its rate at 100-1000 Mbit/s with TCP. With 25 ms
the queue overflowed whenever the machine was slow to run the senders, and TCP's backing off cost
15-20% of the rate on some links."""
TBF_STALL_S = 0.02
"""The bucket holds 20 ms of the rate (64 KiB at least). tbf caps its tokens at the bucket, so a
link whose timer fires late (a busy or descheduled virtual machine) loses every ms past the
bucket's worth for good: with 64 KiB (3 ms at 150 Mbit/s), 20 ms lost per 2 MiB message would
cost 17% of the rate, as one CI run measured. A real NIC keeps sending through such a stall;
20 ms of tokens let the lab catch up as it would. Short idle gaps give credit only for the time they idled, so no timed transfer beats the rate."""


def tbf_args(mbit: float) -> list[str]:
    """``tc qdisc ... tbf`` parameters for a link of ``mbit`` Mbit/s."""
    burst = max(64 * 1024, int(mbit * 1e6 / 8 * TBF_STALL_S))
    return ["rate", f"{mbit:g}mbit", "burst", str(burst), "latency", TBF_LATENCY]


OBJECT_STORE_BYTES = 200 * 2**20
"""Small object stores: the lab's nodes share one machine's memory."""
REPO = Path(__file__).resolve().parents[1]


class LabUnavailable(RuntimeError):
    """This machine cannot build a lab (not root, no iproute2, namespaces refused)."""


def mbit_to_gbps(mbit: float) -> float:
    """Mbit/s to GB/s (the topology's unit)."""
    return mbit / 8000.0


def gbps_to_mbit(gbps: float) -> float:
    return gbps * 8000.0


def lab_topology(
    hosts: int = 6,
    per_leaf: int = 3,
    host_mbit: float = 400.0,
    uplink_mbit: float = 200.0,
    degraded: dict[str, float] | None = None,
    gpus_per_host: int | Sequence[int] = 1,
    interleaved: bool = True,
) -> Topology:
    """A small leaf-spine cluster in the node/link form, sized for one machine.

    Host ``hI`` hangs from leaf ``I % leaves`` so that the address order (the
    order Ray lists nodes in) alternates between leaves, as it does on real
    clusters where Ray's order knows nothing of racks; ``interleaved=False``
    racks them in address order instead (leaf ``I // per_leaf``), where Ray's
    order is already leaf by leaf.

    Parameters
    ----------
    hosts, per_leaf : int
        Number of hosts, and of hosts per leaf (must divide ``hosts``).
    host_mbit, uplink_mbit : float
        Rate of each host link and of each leaf's uplink to the spine, per direction.
    degraded : dict, optional
        Host name -> slower host-link rate in Mbit/s.
    gpus_per_host : int or sequence of int
        GPU nodes per host (one count for all, or one per host: mixed host
        sizes); the lab's Ray nodes advertise as many (fake) GPUs.
    interleaved : bool
        Leaves alternate in address order (default) or follow it in blocks.
    """
    if hosts < 1 or per_leaf < 1 or hosts % per_leaf:
        raise ConfigError(f"per_leaf ({per_leaf}) must divide hosts ({hosts})")
    counts = [gpus_per_host] * hosts if isinstance(gpus_per_host, int) else list(gpus_per_host)
    if len(counts) != hosts or min(counts) < 1:
        raise ConfigError(f"gpus_per_host {gpus_per_host!r} must be one count >= 1, or one per host ({hosts})")
    degraded = degraded or {}
    unknown = set(degraded) - {f"h{i}" for i in range(hosts)}
    if unknown:
        raise ConfigError(f"degraded host(s) {', '.join(sorted(unknown))} not in h0..h{hosts - 1}")
    leaves = hosts // per_leaf
    topo = Topology(name=f"netlab-{hosts}x")
    topo.add_node("spine", "spine")
    for k in range(leaves):
        topo.add_node(f"leaf{k}", "leaf")
        topo.add_link(f"leaf{k}", "spine", mbit_to_gbps(uplink_mbit), 2.0)
    for i in range(hosts):
        host = topo.add_node(f"h{i}", "host")
        nic = topo.add_node(f"{host}/nic0", "nic", host=host, index=0)
        leaf = i % leaves if interleaved else i // per_leaf
        topo.add_link(nic, f"leaf{leaf}", mbit_to_gbps(degraded.get(host, host_mbit)), 2.0)
        for g in range(counts[i]):
            topo.add_link(topo.add_node(f"{host}/gpu{g}", "gpu", host=host, index=g), nic, 25.0, 1.0)
    return topo


@dataclass
class LabHost:
    """One emulated host: its namespace, address and shaped link."""

    name: str
    ns: str
    ip: str
    leaf: str
    mbit: float
    """Host-link rate, each direction."""
    gpus: int
    port: str
    """Its veth end on the leaf bridge (in the fabric namespace)."""


@dataclass
class LabPlan:
    """What to build, read from a node/link topology."""

    hosts: list[LabHost]
    uplink_mbit: dict[str, float]
    """Leaf -> uplink rate to the spine, each direction."""
    leaves: list[str] = field(default_factory=list)

    @classmethod
    def from_topology(cls, topo: Topology, prefix: str) -> "LabPlan":
        spines = topo.nodes_of_kind("spine")
        if len(spines) != 1:
            raise ConfigError(f"{topo.name}: the lab needs exactly one spine node, found {len(spines)}")
        uplinks: dict[str, float] = {}
        for leaf in topo.nodes_of_kind("leaf"):
            if not topo.graph.has_edge(leaf, spines[0]):
                raise ConfigError(f"{topo.name}: leaf {leaf!r} has no link to the spine")
            uplinks[leaf] = gbps_to_mbit(topo.link(leaf, spines[0])["bw_gbps"])
        hosts = []
        for i, name in enumerate(topo.hosts):
            nics = topo.nics(name)
            leaf = topo.leaf_of(name)
            if not nics or leaf is None or not topo.graph.has_edge(nics[0], leaf):
                raise ConfigError(f"{topo.name}: host {name!r} needs a NIC linked to a leaf")
            if "/" in name or len(name) > 12:
                raise ConfigError(f"{topo.name}: host name {name!r} must be at most 12 characters without '/'")
            ip = str(SUBNET.network_address + i + 1)
            mbit = gbps_to_mbit(topo.link(nics[0], leaf)["bw_gbps"])
            hosts.append(LabHost(name, f"{prefix}{name}", ip, leaf, mbit, len(topo.gpus(name)), name))
        return cls(hosts, uplinks, list(uplinks))


def unavailable_reason() -> str | None:
    """Why this machine cannot build a lab, or None when it can."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"iproute2 is missing ({' and '.join(missing)} not on PATH); install it: apt-get install iproute2"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN); run as root"
    probe = f"{PREFIX}probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"cannot create a network namespace: {made.stderr.strip() or 'ip netns add failed'}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _sh(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")


class NetLab:
    """Builds the namespaces, links, shaping and Ray nodes; ``down`` undoes all of it.

    Use as a context manager; an ``atexit`` hook also tears it down when the
    process ends without leaving the ``with`` block.
    """

    def __init__(self, topo: Topology, start_ray: bool = True, cpus_per_host: int = 1) -> None:
        reason = unavailable_reason()
        if reason:
            raise LabUnavailable(reason)
        self.prefix = f"{PREFIX}{secrets.token_hex(3)}-"
        self.topo = topo
        self.plan = LabPlan.from_topology(topo, self.prefix)
        self.fabric = f"{self.prefix}fab"
        self.start_ray = start_ray
        self.cpus_per_host = cpus_per_host
        self.tmp = Path(tempfile.mkdtemp(prefix=self.prefix))
        (self.tmp / "home").mkdir()
        self._namespaces: list[str] = []

    # ------------------------------------------------------------------ access
    @property
    def hosts(self) -> list[LabHost]:
        return self.plan.hosts

    @property
    def head(self) -> LabHost:
        return self.plan.hosts[0]

    @property
    def address(self) -> str:
        """The Ray GCS address, for ``ray.init(address=...)`` and ``ray start --address``."""
        return f"{self.head.ip}:{HEAD_PORT}"

    @property
    def dashboard_url(self) -> str:
        """The address ``ray job submit --address`` takes."""
        return f"http://{self.head.ip}:{DASHBOARD_PORT}"

    def env(self) -> dict[str, str]:
        """Environment for processes in the lab: gloo binds the lab interface, imports find the repo."""
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        env["PYTHONPATH"] = f"{REPO}:{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
        # A home of the lab's own: the machine's ~/.ray (auth tokens, sessions) belongs to other clusters.
        env["HOME"] = str(self.tmp / "home")
        env["XDG_CACHE_HOME"] = str(self.tmp / "home" / ".cache")
        # ...but DeepSpeed's compiled ops are the machine's, as a cluster image ships them: built once, not per lab.
        env["TORCH_EXTENSIONS_DIR"] = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")
        # Ray turns token auth on in a process once an embedded cluster has started there (RAY_AUTH_MODE in its
        # environment); the lab's nodes sit on a private test network, so it runs without, whatever ran before.
        for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            env.pop(key, None)
        env["RAY_AUTH_MODE"] = "disabled"
        env.update(GLOO_SOCKET_IFNAME="eth0", NCCL_SOCKET_IFNAME="eth0", RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1",
                   RAY_raylet_start_wait_time_s="180")  # several raylets starting at once on 2 cores
        return env

    def command(self, cmd: list[str], host: LabHost | None = None) -> list[str]:
        """``cmd`` prefixed to run inside ``host``'s namespace (the head's by default)."""
        return ["ip", "netns", "exec", (host or self.head).ns, *cmd]

    def run(self, cmd: list[str], host: LabHost | None = None, timeout: float = 300, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside the lab (the head's namespace by default) and wait for it."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        done = subprocess.run(self.command(cmd, host), env=self.env(), cwd=REPO, timeout=timeout, **kw)
        if check and done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} in {(host or self.head).name} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    # ------------------------------------------------------------------- build
    def __enter__(self) -> "NetLab":
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> "NetLab":
        atexit.register(self.down)
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            # Plain SIGTERM skips atexit; turned into SystemExit, it tears the lab down too.
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        try:
            self._build_network()
            if self.start_ray:
                self._start_ray()
        except BaseException:
            self.down()
            raise
        return self

    def _netns(self, name: str) -> str:
        _sh("ip", "netns", "add", name)
        self._namespaces.append(name)
        _sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def _shape(self, ns: str, dev: str, mbit: float) -> None:
        _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", *tbf_args(mbit))

    def _build_network(self) -> None:
        fab = self._netns(self.fabric)
        for bridge in [*self.plan.leaves, "spine"]:
            _sh("ip", "-n", fab, "link", "add", bridge, "type", "bridge")
            _sh("ip", "-n", fab, "link", "set", bridge, "up")
        for k, leaf in enumerate(self.plan.leaves):
            _sh("ip", "-n", fab, "link", "add", f"up{k}", "type", "veth", "peer", "name", f"sp{k}")
            _sh("ip", "-n", fab, "link", "set", f"up{k}", "master", leaf, "up")
            _sh("ip", "-n", fab, "link", "set", f"sp{k}", "master", "spine", "up")
            self._shape(fab, f"up{k}", self.plan.uplink_mbit[leaf])
            self._shape(fab, f"sp{k}", self.plan.uplink_mbit[leaf])
        for h in self.hosts:
            ns = self._netns(h.ns)
            _sh("ip", "-n", fab, "link", "add", h.port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _sh("ip", "-n", fab, "link", "set", h.port, "master", h.leaf, "up")
            _sh("ip", "-n", ns, "addr", "add", f"{h.ip}/{SUBNET.prefixlen}", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            self._shape(ns, "eth0", h.mbit)
            self._shape(fab, h.port, h.mbit)

    def _ray_start(self, host: LabHost, *args: str) -> subprocess.Popen:
        cmd = ["ray", "start", f"--node-ip-address={host.ip}", f"--num-cpus={self.cpus_per_host}", f"--num-gpus={host.gpus}",
               "--disable-usage-stats", "--include-log-monitor=false", f"--object-store-memory={OBJECT_STORE_BYTES}",
               # a temp dir per node: raylets starting at once in one dir race for socket names
               f"--temp-dir={self.tmp / host.name}", *args]
        log = open(self.tmp / f"ray-start-{host.name}.log", "w")
        return subprocess.Popen(self.command(cmd, host), env=self.env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def _start_ray(self) -> None:
        head = self._ray_start(self.head, "--head", f"--port={HEAD_PORT}", f"--dashboard-host={self.head.ip}",
                               f"--dashboard-port={DASHBOARD_PORT}")
        self._wait_started([head], [self.head])
        workers = [self._ray_start(h, f"--address={self.address}") for h in self.hosts[1:]]
        self._wait_started(workers, self.hosts[1:])

    def _wait_started(self, procs: list[subprocess.Popen], hosts: list[LabHost], timeout: float = 240) -> None:
        """Wait for every ``ray start``; five raylets starting at once on a busy 2-core machine took over 2 minutes."""
        deadline = time.monotonic() + timeout
        for proc, host in zip(procs, hosts):
            try:
                code = proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                code = None
            if code != 0:
                log = (self.tmp / f"ray-start-{host.name}.log").read_text()[-2000:]
                raise RuntimeError(f"ray start on {host.name} ({host.ip}) failed ({code}):\n{log}")

    # ---------------------------------------------------------------- teardown
    def down(self) -> None:
        """Stop every process in the lab's namespaces, then delete them (links and bridges go with them)."""
        atexit.unregister(self.down)
        # A second Ctrl-C must not leave half a lab behind.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            remove_namespaces(self._namespaces)
            self._namespaces = []
            shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)


def remove_namespaces(names: list[str]) -> None:
    """Kill the processes inside ``names`` (only those: ``ray stop`` would hit every Ray on the machine) and delete them."""
    pids = {ns: _pids_in(ns) for ns in names}
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        for ns_pids in pids.values():
            for pid in ns_pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_pids_in(ns) for ns in names):
            time.sleep(0.1)
        pids = {ns: _pids_in(ns) for ns in names}
        if not any(pids.values()):
            break
    for ns in reversed(names):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _pids_in(ns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def leftover_namespaces() -> list[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in done.stdout.splitlines() if line.startswith(PREFIX)]


# --------------------------------------------------------------------- command line
def _parse_degrade(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        host, _, mbit = item.partition("=")
        try:
            out[host] = float(mbit)
        except ValueError:
            raise ConfigError(f"--degrade {item!r}: expected HOST=MBIT, e.g. h3=300") from None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.netlab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="build a lab and keep it until Ctrl-C")
    up.add_argument("--topology", help="node/link YAML or JSON (one spine); default: lab_topology()")
    up.add_argument("--hosts", type=int, default=6)
    up.add_argument("--per-leaf", type=int, default=3)
    up.add_argument("--host-mbit", type=float, default=400.0)
    up.add_argument("--uplink-mbit", type=float, default=200.0)
    up.add_argument("--degrade", action="append", default=[], metavar="HOST=MBIT")
    up.add_argument("--no-ray", action="store_true", help="network only")
    sub.add_parser("down", help="remove every lab namespace (and its processes) left on this machine")
    args = parser.parse_args(argv)
    try:
        if args.action == "down":
            names = leftover_namespaces()
            remove_namespaces(names)
            for tmp in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
                shutil.rmtree(tmp, ignore_errors=True)
            print(f"removed {len(names)} namespace(s)")
            return 0
        topo = Topology.load(args.topology) if args.topology else lab_topology(
            args.hosts, args.per_leaf, args.host_mbit, args.uplink_mbit, _parse_degrade(args.degrade))
        with NetLab(topo, start_ray=not args.no_ray) as lab:
            for h in lab.hosts:
                print(f"{h.name:>6}  {h.ip:<14} {h.leaf:<8} {h.mbit:g} Mbit/s  ns {h.ns}")
            for leaf, mbit in lab.plan.uplink_mbit.items():
                print(f"{leaf:>6}  uplink {mbit:g} Mbit/s")
            if lab.start_ray:
                print(f"\nRay head {lab.address}, dashboard {lab.dashboard_url}. Try:")
                print(f"  ip netns exec {lab.head.ns} env GLOO_SOCKET_IFNAME=eth0 python -m launcher profile --address {lab.address}")
            print("Ctrl-C tears the lab down.", flush=True)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
        return 0
    except (ConfigError, LabUnavailable) as exc:
        print(f"netlab: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
