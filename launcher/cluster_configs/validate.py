"""Would Ray accept this cluster config? Asked of Ray itself, offline.

Cluster-launcher YAML goes through ``prepare_config`` (provider defaults
merged) and ``validate_config`` (Ray's JSON schema plus its cross-checks);
a RayCluster manifest through a structural check of the fields KubeRay
documents and then through the adapter Ray's in-tree KubeRay autoscaler
uses to read it. Every rejection is one ConfigError line in Ray's words.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

from topology.errors import ConfigError


def validate(config: dict[str, Any], source: str = "cluster config") -> None:
    """Raise ConfigError (one line, Ray's own words where Ray objects) if the config would not run."""
    if config.get("kind") == "RayCluster" or "apiVersion" in config:
        _check_raycluster(config, source)
    else:
        _check_launcher_config(config, source)


def _check_launcher_config(config: dict[str, Any], source: str) -> None:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = copy.deepcopy(config)
    try:
        if cfg.get("provider", {}).get("type") != "fake_multinode":
            # The fake provider ships no defaults and its monitor reads the file as is.
            cfg = prepare_config(cfg)
        validate_config(cfg)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "top level"
        raise ConfigError(f"{source}: Ray rejects it at {where}: {exc.message}") from None
    except (ValueError, RuntimeError, KeyError, AssertionError, NotImplementedError) as exc:
        raise ConfigError(f"{source}: Ray rejects it: {exc}") from None
    for name, node in cfg["available_node_types"].items():
        # Ray quietly clamps min_workers to max_workers; a recipe-sized config must not rely on that.
        if node.get("min_workers", 0) > node.get("max_workers", cfg["max_workers"]):
            raise ConfigError(f"{source}: node type {name!r}: min_workers ({node['min_workers']}) > max_workers ({node['max_workers']})")


_RAYCLUSTER_KEYS = {
    "spec": {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
             "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions", "upgradeStrategy"},
    "headGroupSpec": {"serviceType", "headService", "enableIngress", "rayStartParams", "template", "labels", "resources"},
    "workerGroupSpec": {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "idleTimeoutSeconds",
                        "rayStartParams", "template", "scaleStrategy", "suspend", "labels", "resources"},
}
"""Fields of KubeRay's RayCluster types (ray-operator/apis/ray/v1/raycluster_types.go, v1.5)."""


def _check_raycluster(cr: dict[str, Any], source: str) -> None:
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {msg}")

    need(cr.get("apiVersion") == "ray.io/v1", f"apiVersion is {cr.get('apiVersion')!r}; KubeRay serves ray.io/v1")
    need(cr.get("kind") == "RayCluster", f"kind is {cr.get('kind')!r}; expected RayCluster")
    need(bool((cr.get("metadata") or {}).get("name")), "metadata.name is missing")
    spec = cr.get("spec")
    need(isinstance(spec, dict), "spec is missing")
    _no_unknown(spec, _RAYCLUSTER_KEYS["spec"], "spec", need)
    need(spec.get("enableInTreeAutoscaling") is True, "spec.enableInTreeAutoscaling must be true so the cluster grows with each stage")
    head = spec.get("headGroupSpec")
    need(isinstance(head, dict), "spec.headGroupSpec is missing")
    _no_unknown(head, _RAYCLUSTER_KEYS["headGroupSpec"], "spec.headGroupSpec", need)
    _check_pod(head, "spec.headGroupSpec", need)
    groups = spec.get("workerGroupSpecs")
    need(isinstance(groups, list) and groups, "spec.workerGroupSpecs must list at least one worker group")
    names = [g.get("groupName") for g in groups]
    need(len(set(names)) == len(names), f"spec.workerGroupSpecs: group names repeat ({names})")
    for i, g in enumerate(groups):
        where = f"spec.workerGroupSpecs[{i}]"
        _no_unknown(g, _RAYCLUSTER_KEYS["workerGroupSpec"], where, need)
        lo, hi, n = g.get("minReplicas"), g.get("maxReplicas"), g.get("replicas", g.get("minReplicas"))
        need(all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (lo, hi, n)), f"{where}: minReplicas/maxReplicas/replicas must be whole numbers >= 0")
        need(lo <= hi, f"{where}: minReplicas ({lo}) > maxReplicas ({hi})")
        need(lo <= n <= hi, f"{where}: replicas ({n}) outside [minReplicas {lo}, maxReplicas {hi}]")
        _check_pod(g, where, need)
    try:
        _derive_autoscaling_config_from_ray_cr(copy.deepcopy(cr) | {"metadata": {"namespace": "default", **cr["metadata"]}})
    except Exception as exc:  # Ray's adapter raises schema, value and key errors alike
        first = (getattr(exc, "message", None) or str(exc)).splitlines()[0]
        raise ConfigError(f"{source}: Ray's KubeRay autoscaler rejects it: {first}") from None


def _check_pod(group: dict[str, Any], where: str, need: Callable[[bool, str], None]) -> None:
    params = group.get("rayStartParams", {})
    need(isinstance(params, dict) and all(isinstance(v, str) for v in params.values()), f"{where}.rayStartParams values must be strings")
    containers = (((group.get("template") or {}).get("spec") or {}).get("containers")) or []
    need(bool(containers) and all(c.get("name") and c.get("image") for c in containers), f"{where}.template.spec.containers needs a named container with an image")
    need(isinstance((containers[0].get("resources") or {}).get("limits"), dict), f"{where}: the Ray container needs resources.limits (the autoscaler sizes nodes from them)")


def _no_unknown(obj: dict[str, Any], known: set[str], where: str, need: Callable[[bool, str], None]) -> None:
    unknown = sorted(set(obj) - known)
    need(not unknown, f"{where}: unknown field(s) {', '.join(unknown)}")
