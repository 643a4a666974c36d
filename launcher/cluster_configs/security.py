"""What a cluster config exposes: static checks of a config before anyone starts it.

A Ray head accepts jobs, that is, code to run on every host. Whoever can
reach its job API (dashboard port 8265), GCS (6379) or client server
(10001) without a token can run anything on the cluster, which is how
public Ray dashboards have been taken over. Each check below names one way a
config lets that happen, where in the file, and what to write instead:

- ``ray start`` without ``RAY_AUTH_MODE=token``, or a RayCluster without
  ``authOptions.mode: token``;
- a dashboard bound to every interface while no token is asked for;
- a token written into the file instead of read from a file or Secret;
- no security group (Ray would make one open to SSH from anywhere), no
  NetworkPolicy, or a Service of type NodePort/LoadBalancer;
- ``pip install`` of versions other than the lock file's, or of ranges;
- placeholders (``subnet-REPLACE-ME``, ``<your-ip>``) left in.

Every check returns findings; ``ringleader clusters validate`` prints them
as warnings with the line to change.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any, Iterator

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from launcher.cluster_configs import lock

WILDCARDS = {"0.0.0.0", "::", "[::]", "*"}
PLACEHOLDER = re.compile(r"REPLACE[-_]?ME|CHANGE[-_]?ME|<[A-Za-z][^<>\s]*>")
TOKEN_LITERAL = re.compile(r"RAY_AUTH_TOKEN=(?![\"']?\$)\S+")
TOKEN_MODE = re.compile(r"RAY_AUTH_MODE=token\b")


@dataclass(frozen=True)
class Finding:
    """One exposure: where (document index, then keys/indices into it), what, and what to write instead."""

    path: tuple[Any, ...]
    message: str
    fix: str


def audit(docs: list[dict[str, Any]], pins: dict[str, str] | None = None) -> list[Finding]:
    """Findings for every document of one file (a launcher YAML, or a RayCluster with its companions)."""
    pins = lock.read() if pins is None else pins
    found: list[Finding] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            continue
        found += [Finding((i, *p), m, f) for p, m, f in _placeholders(doc)]
        if doc.get("kind") == "RayCluster":
            found += [Finding((i, *p), m, f) for p, m, f in _raycluster(doc, docs, pins)]
        elif "available_node_types" in doc:
            found += [Finding((i, *p), m, f) for p, m, f in _launcher(doc, pins)]
    return found


# ------------------------------------------------------------------ cluster launcher
def _launcher(cfg: dict[str, Any], pins: dict[str, str]) -> Iterator[tuple[tuple, str, str]]:
    if cfg.get("provider", {}).get("type") == "fake_multinode":
        return  # its nodes are processes of the head, started with the head's environment
    lists = [k for k in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                         "head_start_ray_commands", "worker_start_ray_commands") if isinstance(cfg.get(k), list)]
    exported = any("export RAY_AUTH_MODE=token" in c for k in lists for c in cfg[k] if isinstance(c, str))
    token_file = any(str(dst).rstrip("/").endswith(".ray/auth_token") for dst in (cfg.get("file_mounts") or {}))
    auth = False
    for key in lists:
        for j, cmd in enumerate(cfg[key]):
            if not isinstance(cmd, str):
                continue
            where = (key, j)
            if "ray start" in cmd:
                on = bool(TOKEN_MODE.search(cmd)) or exported
                auth = auth or on
                if not on:
                    yield where, "`ray start` without token authentication: anyone who reaches this node's Ray ports can run code on the cluster", \
                        "put RAY_AUTH_MODE=token before `ray start` (and mount the token, see file_mounts)"
                host = _flag(cmd, "--dashboard-host")
                if host in WILDCARDS and not on:
                    yield where, f"the dashboard and job API listen on every interface ({host}) without a token", \
                        "--dashboard-host=127.0.0.1 and reach it with `ray dashboard CONFIG`"
            if TOKEN_LITERAL.search(cmd):
                yield where, "the Ray auth token is written into the config", \
                    "copy the token file instead: file_mounts: {~/.ray/auth_token: ~/.ray/auth_token}"
            yield from ((where, m, f) for m, f in _pip(cmd, pins))
    if auth and not token_file:
        yield ("file_mounts",), "token authentication is on but no node gets the token", \
            "file_mounts: {~/.ray/auth_token: ~/.ray/auth_token} (made by `ray get-auth-token --generate`)"
    if cfg.get("provider", {}).get("type") == "aws":
        for name, node in (cfg.get("available_node_types") or {}).items():
            nc = node.get("node_config") or {}
            groups = nc.get("SecurityGroupIds") or [g for ni in nc.get("NetworkInterfaces") or [] for g in ni.get("Groups") or []]
            if not groups and "LaunchTemplate" not in nc:
                yield ("available_node_types", name, "node_config"), \
                    "no security group: Ray's default one admits SSH from 0.0.0.0/0", \
                    "SecurityGroupIds: [a group that admits itself and SSH from your CIDR] (see the header of clusters/aws-g6e.yaml)"


def _flag(cmd: str, name: str) -> str | None:
    m = re.search(rf"{re.escape(name)}[= ]+(\S+)", cmd)
    return m.group(1).strip("'\"") if m else None


def _pip(cmd: str, pins: dict[str, str]) -> Iterator[tuple[str, str]]:
    """Findings for every ``pip install`` in a shell command: ranges, or pins other than the lock's."""
    for part in re.split(r"&&|\|\||;|\|", cmd):
        try:
            words = shlex.split(part)
        except ValueError:
            continue
        if "pip" not in " ".join(words[:3]) or "install" not in words:
            continue
        args = words[words.index("install") + 1:]
        constrained = project = False
        specs = []
        k = 0
        while k < len(args):
            a = args[k]
            if a in ("-c", "--constraint", "-r", "--requirement"):
                if k + 1 < len(args) and args[k + 1].endswith("requirements.lock"):
                    constrained = True
                k += 2
                continue
            if a in ("-e", "--editable"):
                project = True  # the project itself: its dependencies come as ranges unless constrained
                k += 2
                continue
            if not a.startswith("-"):
                specs.append(a)
            k += 1
        if project and not constrained:
            yield "the project's dependencies install as ranges (pyproject.toml), not the tested versions", \
                f"pip install -c {lock.LOCK_RELPATH} -e ..."
        for spec in specs:
            try:
                req = Requirement(spec)
            except InvalidRequirement:
                continue
            name = canonicalize_name(req.name)
            exact = [s.version for s in req.specifier if s.operator == "=="]
            if exact and name in pins and exact[0] != pins[name]:
                yield f"{spec} differs from the lock ({req.name}=={pins[name]})", f"'{req.name}=={pins[name]}' or `pip install -c {lock.LOCK_RELPATH}`"
            elif not exact and not (constrained and name in pins):
                yield f"{spec} is not pinned: nodes get whatever is newest when they start, not the tested version", \
                    f"pip install -c {lock.LOCK_RELPATH} ... (the tested versions)"


# ------------------------------------------------------------------ KubeRay
def _raycluster(cr: dict[str, Any], docs: list[dict[str, Any]], pins: dict[str, str]) -> Iterator[tuple[tuple, str, str]]:
    spec = cr.get("spec") or {}
    name = (cr.get("metadata") or {}).get("name")
    auth = (spec.get("authOptions") or {}).get("mode") == "token" or bool((spec.get("authOptions") or {}).get("enableK8sTokenAuth"))
    if not auth:
        yield ("spec",), "Ray token authentication is off: any pod that reaches the head can run code on the cluster", \
            "spec.authOptions: {mode: token} (KubeRay >= 1.5.1 makes the Secret and sets RAY_AUTH_MODE/RAY_AUTH_TOKEN)"
    head = spec.get("headGroupSpec") or {}
    host = (head.get("rayStartParams") or {}).get("dashboard-host", "0.0.0.0")  # KubeRay's default
    if host in WILDCARDS and not auth:
        yield ("spec", "headGroupSpec", "rayStartParams"), f"the dashboard and job API listen on every interface ({host}) without a token", \
            "turn on spec.authOptions (mode: token)"
    if head.get("serviceType") in ("NodePort", "LoadBalancer"):
        yield ("spec", "headGroupSpec", "serviceType"), f"serviceType {head['serviceType']} puts the head's ports outside the cluster", \
            "serviceType: ClusterIP and `kubectl port-forward`"
    groups = [("spec", "headGroupSpec")] + [("spec", "workerGroupSpecs", i) for i in range(len(spec.get("workerGroupSpecs") or []))]
    for g in groups:
        group = spec
        for key in g[1:]:
            group = group[key]
        pod = ((group or {}).get("template") or {}).get("spec") or {}
        for c, ctr in enumerate(pod.get("containers") or []):
            at = (*g, "template", "spec", "containers", c)
            for e, env in enumerate(ctr.get("env") or []):
                if env.get("name") == "RAY_AUTH_TOKEN" and "value" in env:
                    yield (*at, "env", e), "the Ray auth token is written into the manifest", \
                        "valueFrom: {secretKeyRef: {name: <secret>, key: auth_token}}, or spec.authOptions"
            for field in ("command", "args"):
                for a, text in enumerate(ctr.get(field) or []):
                    if isinstance(text, str):
                        for m, f in _pip(text, pins):
                            yield (*at, field, a), m, f
    policies = [d for d in docs if isinstance(d, dict) and d.get("kind") == "NetworkPolicy"]
    own = {"ray.io/cluster": name}
    guarded = [p for p in policies if ((p.get("spec") or {}).get("podSelector") or {}).get("matchLabels") == own]
    if not guarded:
        yield ("metadata", "name"), "no NetworkPolicy: every pod in the Kubernetes cluster can reach this Ray cluster's ports", \
            "add a NetworkPolicy selecting ray.io/cluster: NAME that admits only those pods (`ringleader clusters render --provider kuberay` writes one)"
    for p in guarded:
        for rule in (p.get("spec") or {}).get("ingress") or []:
            sources = rule.get("from")
            if not sources or any(s.get("ipBlock") or s.get("namespaceSelector") == {} for s in sources):
                yield ("metadata", "name"), f"NetworkPolicy {p['metadata'].get('name')} admits traffic from outside the Ray cluster", \
                    "ingress: [{from: [{podSelector: {matchLabels: {ray.io/cluster: NAME}}}]}]"
    for d in docs:
        if isinstance(d, dict) and d.get("kind") == "ConfigMap" and "requirements.lock" in (d.get("data") or {}):
            locked = lock.parse(d["data"]["requirements.lock"])
            if locked != pins:
                diff = sorted(set(locked.items()) ^ set(pins.items()))[:3]
                yield ("metadata", "name"), f"ConfigMap {d['metadata'].get('name')} pins other versions than {lock.LOCK_RELPATH} (e.g. {diff})", \
                    "re-render: ringleader clusters render ... --provider kuberay"


# ------------------------------------------------------------------ any config
def _placeholders(doc: Any, path: tuple = ()) -> Iterator[tuple[tuple, str, str]]:
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _placeholders(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _placeholders(v, (*path, i))
    elif isinstance(doc, str) and not path[-1:] == ("requirements.lock",):
        m = PLACEHOLDER.search(doc)
        if m:
            key = next((k for k in reversed(path) if isinstance(k, str)), "")
            flag = next((f for part, f in _RENDER_FLAGS.items() if part in key), None)
            fix = f"your own value (or render with {flag})" if flag else "your own value"
            yield path, f"placeholder {m.group(0)!r} left in {key or 'a value'} ({doc[:60]})", fix


_RENDER_FLAGS = {"Subnet": "--subnet", "Group": "--security-group", "Image": "--image", "namespace": "--namespace"}
"""The ``clusters render`` option that fills a placeholder, by (part of) the key that holds it."""
