"""RayCluster manifests checked against KubeRay's own CRD schema, as ``kubectl apply`` would.

``raycluster-crd.json`` is the ``openAPIV3Schema`` of the ray.io/v1
RayCluster CRD copied from KubeRay's Helm chart (its ``source``,
``kuberay_version`` and ``commit`` say exactly which file). The API server
prunes fields a structural schema does not declare, and ``kubectl``
(strict field validation, the default since Kubernetes 1.27) rejects them;
here every object schema that declares its properties and does not
preserve unknown fields gets ``additionalProperties: false``, so a typo in
a pod template fails here instead of silently vanishing on the cluster.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA_PATH = Path(__file__).with_name("raycluster-crd.json")


@functools.cache
def crd() -> dict[str, Any]:
    """The stored CRD copy: ``source``, ``kuberay_version``, ``commit`` and ``openAPIV3Schema``."""
    return json.loads(SCHEMA_PATH.read_text())


def kuberay_version() -> str:
    return crd()["kuberay_version"]


@functools.cache
def _validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(_strict(crd()["openAPIV3Schema"]))


def _strict(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def schema_errors(cr: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """(path, message) of every place ``cr`` breaks the CRD schema, shallowest first."""
    errors = sorted(_validator().iter_errors(cr), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    out = []
    for e in errors:
        path = tuple(e.absolute_path)
        if e.validator == "additionalProperties" and isinstance(e.instance, dict):
            allowed = set(e.schema.get("properties", {}))
            for key in sorted(set(e.instance) - allowed):
                out.append((path + (key,), f"unknown field {key!r} (KubeRay {kuberay_version()} RayCluster schema)"))
            continue
        out.append((path, e.message))
    return out
