"""What the cluster configs expose, checked without starting them.

Every rendered config: Ray's token auth on, the token from a file or a
Secret and never written into the file, nothing listening on every
interface without a token, installs pinned to clusters/requirements.lock,
and a lock that is this environment's. Configs written by hand: every
exposure comes back from ``ringleader clusters validate`` as a warning that
points at the line to change.
"""

from __future__ import annotations

import copy
import importlib.metadata as md
import re
from pathlib import Path

import pytest
import yaml
from packaging.utils import canonicalize_name

from launcher.cli import main
from launcher.cluster_configs import lock
from launcher.cluster_configs.render import ClusterOptions, documents, render, to_yaml
from launcher.cluster_configs.security import audit
from launcher.cluster_configs.validate import check_file
from launcher.recipe import Recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "clusters/recipes/llama3-8b-4194k.yaml"
EXPOSED = ROOT / "tests" / "data" / "clusters" / "aws-exposed.yaml"
WILDCARD = re.compile(r"(?:dashboard-host[=: ]+['\"]?)(0\.0\.0\.0|::)")


@pytest.fixture(scope="module")
def recipe() -> Recipe:
    return Recipe.load(ROOT / RECIPE, check_paths=False)


def _real(recipe, provider):
    """A config rendered with real site values (no placeholders)."""
    opts = ClusterOptions(subnet_id="subnet-0a1b2c3d", security_group_id="sg-0a1b2c3d", ssh_cidr="203.0.113.7/32")
    return documents(render(recipe, provider, opts))


@pytest.mark.parametrize("provider", ["aws", "kuberay", "local"])
def test_rendered_configs_expose_nothing(recipe, provider):
    docs = _real(recipe, provider)
    assert audit(docs) == []
    text = yaml.safe_dump_all(docs)
    assert "RAY_AUTH_TOKEN=" not in text and not re.search(r"name: RAY_AUTH_TOKEN\s+value:", text)  # never a literal token
    main_doc = docs[-1]
    if provider == "local":  # the fake provider's nodes inherit the head's environment: the header starts it with a token
        header = to_yaml(main_doc, RECIPE, "local").split("\ncluster_name:")[0]
        start = next(line for line in header.splitlines() if "ray start --head" in line)
        assert "RAY_AUTH_MODE=token" in start and "--dashboard-host=127.0.0.1" in start
    if provider == "aws":
        starts = [c for k in ("head_start_ray_commands", "worker_start_ray_commands") for c in main_doc[k] if "ray start" in c]
        assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
        assert "--dashboard-host=127.0.0.1" in starts[0] and not WILDCARD.search(text)
        assert main_doc["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the token travels as a file
        groups = {g for t in main_doc["available_node_types"].values() for g in t["node_config"].get("SecurityGroupIds", [])}
        groups |= {g for t in main_doc["available_node_types"].values() for ni in t["node_config"].get("NetworkInterfaces", []) for g in ni["Groups"]}
        assert groups == {"sg-0a1b2c3d"}
    if provider == "kuberay":
        configmap, policy, cr = docs
        assert cr["spec"]["authOptions"] == {"mode": "token"}  # KubeRay makes the Secret and injects it
        assert cr["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
        own = {"matchLabels": {"ray.io/cluster": cr["metadata"]["name"]}}
        assert policy["spec"] == {"podSelector": own, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": own}]}]}
        assert lock.parse(configmap["data"]["requirements.lock"]) == lock.read()
        for group in [cr["spec"]["headGroupSpec"], *cr["spec"]["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
            assert any(v.get("configMap", {}).get("name") == configmap["metadata"]["name"] for v in pod["volumes"])
            assert f"-c {mounts['requirements']}/requirements.lock" in pod["containers"][0]["args"][0]


@pytest.mark.parametrize("provider", ["aws", "kuberay"])
def test_every_pip_install_uses_the_lock(recipe, provider):
    pins = lock.read()
    lock_file = "~/ringleader/clusters/requirements.lock" if provider == "aws" else "/etc/ringleader/requirements.lock"
    cmds = [c for d in _real(recipe, provider) for c in _strings(d) if "pip install" in c and not c.startswith("#")]
    assert cmds
    for cmd in cmds:
        assert f"-c {lock_file}" in cmd
        for name, version in re.findall(r"'?([A-Za-z0-9_.-]+)(?:\[[a-z,]+\])?==([^'\s]+)", cmd):
            assert pins[canonicalize_name(name)] == version, f"{name}=={version} in {cmd!r} is not the lock's"


def test_lock_is_this_environment(tmp_path, capsys):
    """The pins are the versions the tests run with; if this fails, run `ringleader clusters lock` and re-render."""
    out = tmp_path / "requirements.lock"
    assert main(["clusters", "lock", "-o", str(out)]) == 0
    assert "pins" in capsys.readouterr().out
    fresh, kept = lock.read(out), lock.read()
    assert fresh == kept, f"clusters/requirements.lock is stale: {sorted(set(fresh.items()) ^ set(kept.items()))[:6]}"
    for req in lock.project_dependencies():
        name = canonicalize_name(req.name)
        assert kept[name] == md.version(req.name).split("+")[0]
        assert req.specifier.contains(kept[name], prereleases=True), f"{name}=={kept[name]} breaks pyproject's {req}"


def test_hand_written_exposures_are_warned_at_their_lines(capsys):
    assert main(["clusters", "validate", str(EXPOSED)]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = EXPOSED.read_text().splitlines()
    warnings = [w for w in out if ": warning: " in w]
    where = {}
    for w in warnings:
        m = re.match(rf"{re.escape(str(EXPOSED))}:(\d+): warning: (.*); change to: (.+)$", w)
        assert m, w
        where.setdefault(m.group(2).split(":")[0], []).append(lines[int(m.group(1)) - 1])
    no_auth = where["`ray start` without token authentication"]
    assert len(no_auth) == 2 and all("ray start" in line for line in no_auth)
    assert any("--dashboard-host=0.0.0.0" in line for line in where["the dashboard and job API listen on every interface (0.0.0.0) without a token"])
    unpinned = [line for msg, ls in where.items() if "not pinned" in msg or "install as ranges" in msg for line in ls]
    assert any("boto3" in line for line in unpinned) and any("-e ~/ringleader" in line for line in unpinned)
    placeholders = [line for msg, ls in where.items() if msg.startswith("placeholder") for line in ls]
    assert placeholders and all("REPLACE-ME" in line for line in placeholders)
    assert out[-1].endswith(f"{len(warnings)} warning(s)")
    assert main(["clusters", "validate", "--strict", str(EXPOSED)]) == 2


@pytest.mark.parametrize("mutate, expect, line_has", [
    (lambda docs: docs[2]["spec"].pop("authOptions"), "Ray token authentication is off", "spec:"),
    (lambda docs: docs[2]["spec"]["headGroupSpec"].update(serviceType="LoadBalancer"), "serviceType LoadBalancer", "serviceType: LoadBalancer"),
    (lambda docs: docs[2]["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "RAY_AUTH_TOKEN", "value": "abc123"}), "the Ray auth token is written into the manifest", "name: RAY_AUTH_TOKEN"),
    (lambda docs: docs.pop(1), "no NetworkPolicy", "name: ringleader-llama3-8b-4194k"),
    (lambda docs: docs[1]["spec"]["ingress"][0].update({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}), "admits traffic from outside",
     "name: ringleader-llama3-8b-4194k"),
    (lambda docs: docs[0]["data"].update({"requirements.lock": "torch==2.4.0\n"}), "pins other versions than", "name: ringleader-llama3-8b-4194k"),
    (lambda docs: docs[2]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(args=["pip install torch && ray start"]),
     "torch is not pinned", "pip install torch && ray start"),
])
def test_kuberay_exposures_are_warned_at_their_lines(recipe, tmp_path, mutate, expect, line_has):
    docs = _real(recipe, "kuberay")
    mutate(docs)
    path = tmp_path / "kuberay.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False, width=200))
    report = check_file(path)
    hits = [w for w in report.warnings if expect in w]
    assert len(hits) == 1, report.warnings
    line = int(hits[0].split(":")[1])
    assert line_has in path.read_text().splitlines()[line - 1]


def test_aws_config_without_a_security_group_is_warned(recipe):
    cfg = render(recipe, "aws", ClusterOptions(subnet_id="subnet-0a1b2c3d", security_group_id="sg-0a1b2c3d"))
    cfg = copy.deepcopy(cfg)
    head = cfg["available_node_types"]["ray.head.default"]["node_config"]
    head.pop("SecurityGroupIds")
    assert [f.message for f in audit([cfg])] == ["no security group: Ray's default one admits SSH from 0.0.0.0/0"]


def test_header_tells_how_to_reach_the_job_api_with_the_token(recipe):
    aws = to_yaml(render(recipe, "aws"), RECIPE, "aws", ClusterOptions(ssh_cidr="203.0.113.7/32"))
    assert "--port 22 --cidr 203.0.113.7/32" in aws and "ray dashboard clusters/aws-g6e.yaml" in aws
    assert "RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265" in aws
    kube = to_yaml(render(recipe, "kuberay"), RECIPE, "kuberay")
    assert "kubectl port-forward" in kube and "{.data.auth_token}" in kube


def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj
