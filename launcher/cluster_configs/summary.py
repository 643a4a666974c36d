"""One line saying what a cluster config holds, read back from the config itself.

``render`` prints it for the file it wrote and ``validate`` for the file it
checked, so the line can never disagree with the file: the hosts the
autoscaler may start and their GPUs come from the node types (or worker
groups), the hosts each recipe stage needs from the file's own metadata,
and a stage the file cannot hold says so.
"""

from __future__ import annotations

from typing import Any

STAGE_HOSTS_ANNOTATION = "ringleader.io/stage-hosts"


def capacity(config: dict[str, Any]) -> tuple[int, list[int]]:
    """(most worker hosts the autoscaler may start, GPUs per host of each worker type)."""
    if config.get("kind") == "RayCluster":
        groups = config["spec"].get("workerGroupSpecs") or []
        hosts = sum(int(g.get("maxReplicas", 0)) * int(g.get("numOfHosts", 1)) for g in groups)
        gpus = [int(g["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for g in groups]
        return hosts, sorted(set(gpus))
    workers = {k: v for k, v in config["available_node_types"].items() if k != config.get("head_node_type")}
    hosts = min(int(config.get("max_workers", 0)), sum(int(v.get("max_workers", config.get("max_workers", 0))) for v in workers.values()))
    return hosts, sorted({int((v.get("resources") or {}).get("GPU", 0)) for v in workers.values()})


def stage_hosts(config: dict[str, Any]) -> dict[str, int]:
    """Hosts per recipe stage as the file records them ({} for a config written by hand)."""
    if config.get("kind") == "RayCluster":
        text = ((config.get("metadata") or {}).get("annotations") or {}).get(STAGE_HOSTS_ANNOTATION, "")
        return {k: int(v) for k, v in (item.split("=") for item in text.split(",") if "=" in item)}
    return dict(((config.get("metadata") or {}).get("ringleader") or {}).get("stage_hosts") or {})


def describe(docs: list[dict[str, Any]]) -> str:
    """``up to 64 hosts of 8 GPUs; hosts per stage: 65K=1, ..., 524K=64 (does not fit)``."""
    config = next(d for d in docs if isinstance(d, dict) and (d.get("kind") == "RayCluster" or "available_node_types" in d))
    hosts, gpus = capacity(config)
    line = f"up to {hosts} hosts of {'/'.join(map(str, gpus)) or 0} GPUs"
    stages = stage_hosts(config)
    if stages:
        line += "; hosts per stage: " + ", ".join(f"{k}={v}" + (" (does not fit)" if v > hosts else "") for k, v in stages.items())
    return line
