"""Would this cluster config run, and what does it expose? Asked of Ray, KubeRay and botocore, offline.

Cluster-launcher YAML goes through ``prepare_config`` (provider defaults
merged) and ``validate_config`` (Ray's JSON schema plus its cross-checks);
on AWS every ``node_config`` is then held against the EC2 RunInstances
request it becomes (botocore's service model), so a misspelt key such as
``InstanceTyp`` fails here rather than at launch. A RayCluster manifest
goes through KubeRay's CRD schema (``crd``) and then through the adapter
Ray's in-tree KubeRay autoscaler uses to read it. A rejection is one
ConfigError line naming the file, the line and Ray's (or KubeRay's) words.

``check_file`` adds the security findings of ``security.audit`` as
warnings, each with its line.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.cluster_configs.security import Finding, audit
from topology.errors import ConfigError

Path_ = tuple[Any, ...]


def validate(config: dict[str, Any], source: str = "cluster config", lines: dict[Path_, int] | None = None) -> None:
    """Raise ConfigError (one line, Ray's own words where Ray objects) if the config would not run."""
    found = problems(config)
    if found:
        path, message = found[0]
        raise ConfigError(f"{_where(source, path, lines)}{message}")


def problems(config: dict[str, Any]) -> list[tuple[Path_, str]]:
    """(path, message) of what stops the config from running, most basic first; empty if it would run."""
    if config.get("kind") == "RayCluster" or "apiVersion" in config:
        return _raycluster_problems(config)
    return _launcher_problems(config)


# ------------------------------------------------------------------ cluster launcher
def _launcher_problems(config: dict[str, Any]) -> list[tuple[Path_, str]]:
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
        return [(tuple(exc.absolute_path), f"Ray rejects it at {where}: {exc.message}")]
    except (ValueError, RuntimeError, KeyError, AssertionError, NotImplementedError) as exc:
        return [((), f"Ray rejects it: {exc}")]
    found = []
    for name, node in cfg["available_node_types"].items():
        # Ray quietly clamps min_workers to max_workers; a recipe-sized config must not rely on that.
        if node.get("min_workers", 0) > node.get("max_workers", cfg["max_workers"]):
            found.append((("available_node_types", name, "min_workers"),
                          f"node type {name!r}: min_workers ({node['min_workers']}) > max_workers ({node['max_workers']})"))
    if cfg["provider"]["type"] == "aws":
        for name, node in config["available_node_types"].items():
            found += [(("available_node_types", name, "node_config", *p), m) for p, m in ec2_request_problems(node.get("node_config") or {})]
    return found


RAY_NODE_CONFIG_KEYS = {"SubnetIds": "SubnetId"}
"""Keys Ray's AWS provider reads in a node_config and turns into RunInstances parameters."""


def ec2_request_problems(node_config: dict[str, Any]) -> list[tuple[Path_, str]]:
    """Unknown keys and wrong types in a node_config, against EC2's RunInstances input (botocore's model)."""
    import botocore.session
    from botocore.validate import ParamValidator

    shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    found = list(_unknown_members(node_config, shape, (), extra=set(RAY_NODE_CONFIG_KEYS)))
    if found:
        return found
    params = {k: v for k, v in node_config.items() if k not in RAY_NODE_CONFIG_KEYS} | {"MinCount": 1, "MaxCount": 1}
    report = ParamValidator().validate(params, shape)
    if report.has_errors():
        return [((), "EC2 RunInstances would refuse it: " + report.generate_report().splitlines()[0].strip())]
    return []


def _unknown_members(value: Any, shape: Any, path: Path_, extra: set[str] = frozenset()):
    if shape.type_name == "structure" and isinstance(value, dict):
        for key, sub in value.items():
            if key in shape.members:
                yield from _unknown_members(sub, shape.members[key], (*path, key))
            elif key not in extra:
                close = _closest(key, list(shape.members))
                hint = f"; did you mean {close!r}?" if close else ""
                yield (*path, key), f"unknown key {key!r} in an EC2 RunInstances request{hint}"
    elif shape.type_name == "list" and isinstance(value, list):
        for i, sub in enumerate(value):
            yield from _unknown_members(sub, shape.member, (*path, i))


def _closest(word: str, options: list[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(word, options, n=1, cutoff=0.7)
    return match[0] if match else None


# ------------------------------------------------------------------ KubeRay
def _raycluster_problems(cr: dict[str, Any]) -> list[tuple[Path_, str]]:
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    from launcher.cluster_configs.crd import kuberay_version, schema_errors

    if cr.get("apiVersion") != "ray.io/v1":
        return [(("apiVersion",), f"apiVersion is {cr.get('apiVersion')!r}; KubeRay {kuberay_version()} serves ray.io/v1")]
    if cr.get("kind") != "RayCluster":
        return [(("kind",), f"kind is {cr.get('kind')!r}; expected RayCluster")]
    if not (cr.get("metadata") or {}).get("name"):
        return [(("metadata",), "metadata.name is missing")]
    errors = schema_errors(cr)
    if errors:
        path, message = errors[0]
        return [(path, f"{'.'.join(map(str, path)) or 'top level'}: {message}")]
    spec = cr["spec"]
    found: list[tuple[Path_, str]] = []
    if spec.get("enableInTreeAutoscaling") is not True:
        found.append((("spec",), "spec.enableInTreeAutoscaling must be true so the cluster grows with each stage"))
    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        found.append((("spec",), "spec.workerGroupSpecs must list at least one worker group"))
    names = [g.get("groupName") for g in groups]
    if len(set(names)) != len(names):
        found.append((("spec", "workerGroupSpecs"), f"spec.workerGroupSpecs: group names repeat ({names})"))
    for i, g in enumerate(groups):
        where = f"spec.workerGroupSpecs[{i}]"
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)
        n = g.get("replicas", lo)
        if lo > hi:
            found.append((("spec", "workerGroupSpecs", i, "minReplicas"), f"{where}: minReplicas ({lo}) > maxReplicas ({hi})"))
        elif not lo <= n <= hi:
            found.append((("spec", "workerGroupSpecs", i, "replicas"), f"{where}: replicas ({n}) outside [minReplicas {lo}, maxReplicas {hi}]"))
    for path, group in [(("spec", "headGroupSpec"), spec["headGroupSpec"])] + [(("spec", "workerGroupSpecs", i), g) for i, g in enumerate(groups)]:
        containers = group["template"].get("spec", {}).get("containers") or []
        if not isinstance((containers[0].get("resources") or {}).get("limits") if containers else None, dict):
            found.append(((*path, "template"), f"{'.'.join(map(str, path))}: the Ray container needs resources.limits (the autoscaler sizes nodes from them)"))
    if found:
        return found
    try:
        _derive_autoscaling_config_from_ray_cr(copy.deepcopy(cr) | {"metadata": {"namespace": "default", **cr["metadata"]}})
    except Exception as exc:  # Ray's adapter raises schema, value and key errors alike
        first = (getattr(exc, "message", None) or str(exc)).splitlines()[0]
        return [(("spec",), f"Ray's KubeRay autoscaler rejects it: {first}")]
    return []


# ------------------------------------------------------------------ files
@dataclass
class Report:
    """What ``check_file`` found: the main document, and warnings ``path:line: message; fix`` in file order."""

    main: dict[str, Any]
    docs: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)


def check_file(path: str | Path) -> Report:
    """Validate a config file (raising ConfigError with the line of the first problem) and list its exposures."""
    source = str(path)
    try:
        text = Path(path).read_text()
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
        lines = line_numbers(text)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not YAML ({' '.join(str(exc).split())})") from None
    mains = [i for i, d in enumerate(docs) if isinstance(d, dict) and (d.get("kind") == "RayCluster" or "available_node_types" in d)]
    if len(mains) != 1:
        raise ConfigError(f"{source}: expected one cluster-launcher config or one RayCluster, found {len(mains)}")
    i = mains[0]
    validate(docs[i], source, {p[1:]: n for p, n in lines.items() if p[:1] == (i,)})
    findings = sorted(audit(docs), key=lambda f: lines.get(_known(f.path, lines), 0))
    return Report(docs[i], docs, [_warning(source, f, lines) for f in findings])


def _warning(source: str, f: Finding, lines: dict[Path_, int]) -> str:
    return f"{_where(source, f.path, lines)}warning: {f.message}; change to: {f.fix}"


def _where(source: str, path: Path_, lines: dict[Path_, int] | None) -> str:
    line = (lines or {}).get(_known(path, lines or {}))
    return f"{source}:{line}: " if line else f"{source}: "


def _known(path: Path_, lines: dict[Path_, int]) -> Path_:
    """The longest prefix of ``path`` the file has a line for."""
    while path and path not in lines:
        path = path[:-1]
    return path


def line_numbers(text: str) -> dict[Path_, int]:
    """(document index, key or index, ...) -> 1-based line where that key or item starts."""
    out: dict[Path_, int] = {}

    def walk(node: yaml.Node, path: Path_) -> None:
        out.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value if k.tag == "tag:yaml.org,2002:str" else yaml.safe_load(k.value)
                out[(*path, key)] = k.start_mark.line + 1
                walk(v, (*path, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, (*path, i))

    for d, node in enumerate(yaml.compose_all(text, Loader=yaml.SafeLoader)):
        if node is not None:
            walk(node, (d,))
    return out
