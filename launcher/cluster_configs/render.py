"""Cluster configs sized for a recipe: Ray cluster launcher (AWS, local) and KubeRay.

A recipe says how many GPUs each stage needs; this module turns that into
the configs that bring such a cluster up and let it autoscale between
stages::

    ringleader clusters render clusters/recipes/llama3-8b-4194k.yaml --provider aws -o clusters/aws-g6e.yaml
    ray get-auth-token --generate && ray up clusters/aws-g6e.yaml   # from the repository root
    kubectl apply -f clusters/kuberay.yaml                           # KubeRay >= 1.5.1

Every renderer is a pure function of (recipe, options), so the checked-in
files are reproducible, and every config passes Ray's own checks before it
is written: cluster-launcher YAML through ``prepare_config`` +
``validate_config``, the RayCluster through the KubeRay adapter of Ray's
autoscaler plus KubeRay's own CRD schema.

Secure by default: Ray's token authentication is on (``RAY_AUTH_MODE=token``;
the token reaches nodes as a file the cluster launcher copies, or as the
Secret KubeRay's ``authOptions`` makes), dashboards and job APIs listen on
the head only (loopback on EC2, reached with ``ray dashboard CONFIG``; the
pod network behind a ClusterIP Service and a NetworkPolicy on Kubernetes),
and nodes install the versions of ``clusters/requirements.lock``.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import yaml

from launcher.cluster_configs import lock
from launcher.cluster_configs.summary import STAGE_HOSTS_ANNOTATION
from launcher.cluster_configs.validate import validate
from launcher.recipe import Recipe
from topology.errors import ConfigError

RAY_VERSION = "2.60.0"
"""The Ray the cluster runs; it must equal the Ray of the machine that submits jobs."""
LEAF_LABEL = "ringleader.io/leaf"
"""Ray node label naming the switch (rack) a host hangs from; the profiler groups hosts by it."""
GPU_LABEL = "ringleader.io/gpu-type"
TOKEN_FILE = ".ray/auth_token"
"""Where Ray looks for its auth token under the home directory (``ray get-auth-token --generate`` writes it)."""
LOCK_MOUNT = "/etc/ringleader"
"""Where KubeRay pods see the lock file (from a ConfigMap)."""
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class InstanceType:
    """A cloud machine that carries one host's GPUs."""

    name: str
    gpus: int
    cpus: int
    memory_gib: int
    efa_cards: int
    """Network cards that each take one EFA interface (the instance's full bandwidth needs all)."""


AWS_INSTANCES = {"L40S": InstanceType("g6e.48xlarge", gpus=8, cpus=192, memory_gib=1536, efa_cards=4)}


@dataclass(frozen=True)
class Sizing:
    """Hosts per stage of a recipe: what every provider renders from."""

    recipe: str
    gpu_type: str
    gpus_per_host: int
    stage_hosts: dict[str, int]
    """Stage name -> hosts it needs (ceil(gpus / gpus_per_host)), in stage order."""

    @classmethod
    def from_recipe(cls, recipe: Recipe, gpus_per_host: int) -> "Sizing":
        if gpus_per_host < 1:
            raise ConfigError(f"gpus per host is {gpus_per_host}; it must be >= 1")
        hosts = {s.name: math.ceil(s.gpus / gpus_per_host) for s in recipe.stages}
        return cls(recipe=recipe.name, gpu_type=recipe.gpu_type, gpus_per_host=gpus_per_host, stage_hosts=hosts)

    @property
    def max_hosts(self) -> int:
        return max(self.stage_hosts.values())

    @property
    def upscaling_speed(self) -> float:
        """Largest growth from one stage to the next, so each stage's hosts are requested in one go
        (a cluster placement group fills best when all its instances launch together)."""
        counts = list(self.stage_hosts.values())
        return float(max([1] + [b / a for a, b in zip(counts, counts[1:])]))

    def metadata(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "gpu_type": self.gpu_type, "gpus_per_host": self.gpus_per_host, "stage_hosts": dict(self.stage_hosts)}


@dataclass
class ClusterOptions:
    """Site settings the recipe does not know; the defaults render the checked-in files."""

    region: str = "us-east-1"
    availability_zone: str = "us-east-1a"
    """One zone: a cluster placement group cannot span zones."""
    subnet_id: str = "subnet-REPLACE-ME"
    security_group_id: str = "sg-REPLACE-ME"
    image_id: str = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
    """EC2 resolves this SSM name to the current Deep Learning Base AMI (driver, CUDA, EFA, aws-ofi-nccl)."""
    head_instance_type: str = "m7i.8xlarge"
    idle_timeout_minutes: float = 5.0
    """Hosts idle this long (between stages, after the run) are given back."""
    namespace: str = "default"
    container_image: str = f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    hosts_per_leaf: int = 8
    """Hosts under one switch; KubeRay gets one worker group per leaf so every pod carries its leaf label."""
    local_max_hosts: int = 4
    """Fake hosts the local autoscaler may start (each a Ray node with ``LOCAL_GPUS`` fake GPUs on this machine)."""
    ssh_cidr: str = "<your-ip>/32"
    """Addresses allowed to SSH to the AWS nodes (the cluster launcher's only way in); nothing else is open to the outside."""

    def __post_init__(self) -> None:
        """Each site setting given has the form AWS or Kubernetes takes (the defaults' placeholders pass, and
        ``clusters validate`` flags them): a typo surfaces here, not when the cluster is launched."""
        defaults = {f.name: f.default for f in fields(self)}
        problems = []
        for name, flag, pattern, form in SITE_FORMS:
            value = getattr(self, name)
            if value != defaults[name] and not (isinstance(value, str) and re.fullmatch(pattern, value)):
                problems.append(f"{flag} is {value!r}; give {form}")
                if name == "region":
                    break  # the zone is read against it
        if not problems and (not self.availability_zone.startswith(self.region) or self.availability_zone == self.region):
            problems.append(f"--zone {self.availability_zone!r} is not a zone of --region {self.region!r}; "
                            f"give one such as {self.region}a")
        if self.ssh_cidr != defaults["ssh_cidr"]:
            try:
                ipaddress.ip_network(self.ssh_cidr, strict=False)
            except ValueError:
                problems.append(f"--ssh-cidr is {self.ssh_cidr!r}; give an address block such as 203.0.113.7/32")
        if type(self.hosts_per_leaf) is not int or self.hosts_per_leaf < 1:
            problems.append(f"--hosts-per-leaf is {self.hosts_per_leaf!r}; give the hosts under one switch (>= 1)")
        if problems:
            raise ConfigError("\n".join(problems))

    def warnings(self) -> list[str]:
        """Settings that render but expose the cluster: SSH open to every address."""
        if self.ssh_cidr != type(self).ssh_cidr and ipaddress.ip_network(self.ssh_cidr, strict=False).prefixlen == 0:
            return [f"--ssh-cidr {self.ssh_cidr} lets any address reach the nodes' SSH port; give your own block, "
                    "such as 203.0.113.7/32"]
        return []


SITE_FORMS = (
    ("region", "--region", r"[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d+", "an AWS region such as us-east-1"),
    ("availability_zone", "--zone", r"[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d+(-[a-z]+-\d+)?[a-z]",
     "an availability zone such as us-east-1a"),
    ("subnet_id", "--subnet", r"subnet-([0-9a-f]{8}|[0-9a-f]{17})", "a subnet id such as subnet-0a1b2c3d4e5f67890"),
    ("security_group_id", "--security-group", r"sg-([0-9a-f]{8}|[0-9a-f]{17})", "a security group id such as sg-0a1b2c3d4e5f67890"),
    ("namespace", "--namespace", r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?",
     "a Kubernetes namespace: lower-case letters, digits and '-', at most 63"),
    ("container_image", "--image", r"\S+", f"a container image reference such as rayproject/ray:{RAY_VERSION}-py311-gpu"),
)
"""(field, its flag, the form its value takes, what to give instead) of the site settings checked as given."""


LOCAL_GPUS = 8
"""Fake GPUs of each host the local provider starts."""


# ------------------------------------------------------------------ renderers
def render_aws(recipe: Recipe, opts: ClusterOptions) -> dict[str, Any]:
    """Ray cluster-launcher config for AWS: a CPU head and autoscaling GPU hosts.

    Workers sit in one cluster placement group (one spine block, full
    bisection) with an EFA interface on every network card, so the NCCL
    rings the planner lays out get the instance's full 400 Gbps.
    """
    inst = _instance(recipe.gpu_type)
    size = Sizing.from_recipe(recipe, inst.gpus)
    name = f"ringleader-{recipe.name}"
    efa = [
        {"DeviceIndex": 0 if card == 0 else 1, "NetworkCardIndex": card, "InterfaceType": "efa",
         "SubnetId": opts.subnet_id, "Groups": [opts.security_group_id], "DeleteOnTermination": True}
        for card in range(inst.efa_cards)
    ]
    disk = [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 1000, "VolumeType": "gp3", "Throughput": 1000, "Iops": 16000}}]
    return {
        "cluster_name": name,
        "max_workers": size.max_hosts,
        "upscaling_speed": size.upscaling_speed,
        "idle_timeout_minutes": opts.idle_timeout_minutes,
        "provider": {"type": "aws", "region": opts.region, "availability_zone": opts.availability_zone, "cache_stopped_nodes": False},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {
                "resources": {},  # Ray fills CPU/memory from the instance type at `ray up`
                "node_config": {"InstanceType": opts.head_instance_type, "ImageId": opts.image_id,
                                "SubnetIds": [opts.subnet_id], "SecurityGroupIds": [opts.security_group_id],
                                "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 200, "VolumeType": "gp3"}}]},
                "min_workers": 0,
                "max_workers": 0,
            },
            f"ray.worker.{inst.name}": {
                "resources": {"CPU": inst.cpus, "GPU": inst.gpus},
                "labels": {GPU_LABEL: recipe.gpu_type, "ringleader.io/placement-group": name},
                "node_config": {"InstanceType": inst.name, "ImageId": opts.image_id, "Placement": {"GroupName": name},
                                "NetworkInterfaces": efa, "BlockDeviceMappings": disk},
                "min_workers": 0,
                "max_workers": size.max_hosts,
            },
        },
        "head_node_type": "ray.head.default",
        # The token `ray get-auth-token --generate` wrote on the machine that runs `ray up`; Ray reads it there on every node.
        "file_mounts": {"~/ringleader": ".", f"~/{TOKEN_FILE}": f"~/{TOKEN_FILE}"},
        "rsync_exclude": [".git", "runs", "**/__pycache__"],
        "initialization_commands": [],
        "setup_commands": [
            "test -d ~/venv || python3 -m venv ~/venv",
            "grep -q 'venv/bin/activate' ~/.bashrc || echo 'source ~/venv/bin/activate' >> ~/.bashrc",
            # `ray` on the node (ray job submit, ray status) speaks token auth too.
            "grep -q 'RAY_AUTH_MODE=token' ~/.bashrc || echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc",
            f"~/venv/bin/pip install -q -c ~/ringleader/{lock.LOCK_RELPATH} 'ray[default]=={RAY_VERSION}' boto3 -e ~/ringleader",
        ],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [
            "ray stop",
            # Dashboard and job API on the head's loopback: `ray dashboard CONFIG` tunnels to it over SSH.
            "ulimit -n 65536; RAY_AUTH_MODE=token ray start --head --port=6379 --object-manager-port=8076 "
            "--autoscaling-config=~/ray_bootstrap_config.yaml --dashboard-host=127.0.0.1",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            # libfabric's EFA provider carries NCCL's inter-host traffic (through aws-ofi-nccl).
            "ulimit -n 65536; RAY_AUTH_MODE=token FI_PROVIDER=efa ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076",
        ],
        "metadata": {"ringleader": size.metadata()},
    }


def render_local(recipe: Recipe, opts: ClusterOptions) -> dict[str, Any]:
    """A real autoscaler on one machine (``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...``).

    The fake provider starts each "host" as another Ray node on this machine
    with 8 fake GPUs of the recipe's type, so autoscaling, placement groups
    and host loss can be rehearsed without a cloud. Ray's monitor reads this
    file as written (the fake provider ships no defaults to merge), so every
    key the autoscaler looks up is spelled out.
    """
    return {
        "cluster_name": "ringleader-local",
        "max_workers": opts.local_max_hosts,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 1,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 4, "GPU": 0}, "node_config": {}, "max_workers": 0},
            f"{recipe.gpu_type.lower()}-{LOCAL_GPUS}x": {
                # A small object store per fake host: they all share this machine's memory.
                "resources": {"CPU": 8, "GPU": LOCAL_GPUS, "object_store_memory": 200_000_000},
                "node_config": {},
                "min_workers": 0,
                "max_workers": opts.local_max_hosts,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                               "head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "metadata": {"ringleader": Sizing.from_recipe(recipe, LOCAL_GPUS).metadata()},
    }


def render_kuberay(recipe: Recipe, opts: ClusterOptions) -> dict[str, Any]:
    """A RayCluster (ray.io/v1) with in-tree autoscaling, one worker group per leaf switch.

    Kubernetes cannot hand a node's rack label to a pod, so each leaf gets its
    own group: a nodeSelector keeps its pods on that leaf's machines and the
    group's ``labels`` (KubeRay >= 1.5) become Ray node labels, which the
    profiler reads as the host's switch. ``authOptions`` (KubeRay >= 1.5.1)
    turns on Ray's token authentication: KubeRay makes a Secret named after
    the cluster and gives every Ray container RAY_AUTH_MODE and RAY_AUTH_TOKEN
    from it. The head's dashboard listens on the pod's addresses (loopback for
    ``kubectl port-forward``, the pod IP for the cluster's own pods), behind a
    ClusterIP Service and the NetworkPolicy of ``kuberay_companions``.
    """
    inst = _instance(recipe.gpu_type)
    size = Sizing.from_recipe(recipe, inst.gpus)
    if opts.hosts_per_leaf < 1:
        raise ConfigError(f"hosts per leaf is {opts.hosts_per_leaf}; it must be >= 1")
    name = f"ringleader-{recipe.name}"
    leaves = math.ceil(size.max_hosts / opts.hosts_per_leaf)
    install = " ".join(_runtime_dependencies())
    start = f"ulimit -n 65536; pip install -q -c {LOCK_MOUNT}/requirements.lock {install} && $KUBERAY_GEN_RAY_START_CMD"
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}},
               {"name": "requirements", "configMap": {"name": f"{name}-requirements"}}]

    def container(cname: str, resources: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": cname, "image": opts.container_image,
            # KubeRay >= 1.1 keeps this command and exports its generated `ray start` as KUBERAY_GEN_RAY_START_CMD.
            "command": ["/bin/bash", "-lc", "--"], "args": [start],
            "env": [{"name": "FI_PROVIDER", "value": "efa"},
                    {"name": "RINGLEADER_K8S_NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
            "resources": {"limits": resources, "requests": resources},
            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"},
                             {"name": "requirements", "mountPath": LOCK_MOUNT, "readOnly": True}],
        }

    worker_resources = {"cpu": str(inst.cpus - 8), "memory": f"{inst.memory_gib - 96}Gi", "nvidia.com/gpu": inst.gpus,
                        "vpc.amazonaws.com/efa": inst.efa_cards}
    groups = []
    for i in range(leaves):
        leaf = f"leaf{i}"
        hosts = min(opts.hosts_per_leaf, size.max_hosts - i * opts.hosts_per_leaf)
        groups.append({
            "groupName": f"{inst.name.replace('.', '-')}-{leaf}",
            "replicas": 0, "minReplicas": 0, "maxReplicas": hosts,
            "rayStartParams": {},
            "labels": {LEAF_LABEL: leaf, GPU_LABEL: recipe.gpu_type},
            "template": {
                "metadata": {"labels": {LEAF_LABEL: leaf}},
                "spec": {
                    "nodeSelector": {"node.kubernetes.io/instance-type": inst.name, LEAF_LABEL: leaf},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [container("ray-worker", worker_resources)],
                    "volumes": volumes,
                },
            },
        })
    stage_hosts = ",".join(f"{k}={v}" for k, v in size.stage_hosts.items())
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": name, "namespace": opts.namespace,
                     "labels": {"app.kubernetes.io/name": "ringleader"},
                     "annotations": {"ray.io/overwrite-container-cmd": "true", STAGE_HOSTS_ANNOTATION: stage_hosts}},
        "spec": {
            "rayVersion": RAY_VERSION,
            "authOptions": {"mode": "token"},
            "enableInTreeAutoscaling": True,
            "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": int(opts.idle_timeout_minutes * 60)},
            "headGroupSpec": {
                "serviceType": "ClusterIP",
                # Inside the pod's own network namespace: loopback (port-forward) and the pod IP, nothing else.
                "rayStartParams": {"dashboard-host": "0.0.0.0"},
                "template": {"spec": {"containers": [container("ray-head", {"cpu": "8", "memory": "32Gi"})], "volumes": volumes}},
            },
            "workerGroupSpecs": groups,
        },
    }


def kuberay_companions(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    """What a RayCluster needs beside it: the lock as a ConfigMap, and a NetworkPolicy.

    The policy selects the cluster's pods (KubeRay labels each ``ray.io/cluster:
    NAME``) and admits traffic only from those same pods. ``kubectl
    port-forward`` enters the head pod through the kubelet, not the pod
    network, so it still reaches the dashboard.
    """
    meta = cluster["metadata"]
    own = {"matchLabels": {"ray.io/cluster": meta["name"]}}
    return [
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": f"{meta['name']}-requirements", "namespace": meta["namespace"], "labels": dict(meta["labels"])},
         "data": {"requirements.lock": lock.text()}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"name": f"{meta['name']}-own-pods-only", "namespace": meta["namespace"], "labels": dict(meta["labels"])},
         "spec": {"podSelector": own, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": own}]}]}},
    ]


RENDERERS: dict[str, Callable[[Recipe, ClusterOptions], dict[str, Any]]] = {
    "aws": render_aws,
    "kuberay": render_kuberay,
    "local": render_local,
}

CHECKED_IN = {
    "clusters/aws-g6e.yaml": ("clusters/recipes/llama3-8b-4194k.yaml", "aws"),
    "clusters/kuberay.yaml": ("clusters/recipes/llama3-8b-4194k.yaml", "kuberay"),
    "clusters/local-autoscaling.yaml": ("clusters/recipes/llama3-8b-4194k.yaml", "local"),
}
"""Rendered files the repository keeps -> (recipe, provider) they come from, with default options."""


def render(recipe: Recipe, provider: str, opts: ClusterOptions | None = None) -> dict[str, Any]:
    """The provider's main config (cluster-launcher YAML or RayCluster), checked by Ray before it is returned."""
    if provider not in RENDERERS:
        raise ConfigError(f"provider {provider!r} is not one of {', '.join(RENDERERS)}")
    config = RENDERERS[provider](recipe, opts or ClusterOptions())
    validate(config)
    return config


def documents(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Every document of the file for ``config``: Kubernetes objects the RayCluster needs come first."""
    return kuberay_companions(config) + [config] if config.get("kind") == "RayCluster" else [config]


def to_yaml(config: dict[str, Any], recipe_path: str, provider: str, opts: ClusterOptions | None = None) -> str:
    """The file text: a header saying how it was made and how to use it, then the config's documents."""
    docs = documents(config)
    body = yaml.dump_all(docs, Dumper=_PlainDumper, sort_keys=False, width=200, explicit_start=len(docs) > 1)
    header = [f"# Rendered by `ringleader clusters render {recipe_path} --provider {provider}`; edit the recipe, not this file."]
    usage = [line.format(name=config.get("cluster_name") or config.get("metadata", {}).get("name"),
                         ssh_cidr=(opts or ClusterOptions()).ssh_cidr, lock=lock.LOCK_RELPATH, token=TOKEN_FILE)
             for line in _USAGE[provider]]
    return "\n".join(header + usage) + "\n" + body


class _PlainDumper(yaml.SafeDumper):
    """Writes shared sub-dicts out in full: people read these files, not anchors (&id001)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _literal_block(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    # Multi-line text (the lock in its ConfigMap) as a block people can read line by line.
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_PlainDumper.add_representer(str, _literal_block)

_USAGE = {
    "aws": ["# Nothing listens for the outside but SSH: one security group that admits its own members and SSH from your address:",
            "#   SG=$(aws ec2 create-security-group --group-name {name} --description ringleader --vpc-id <vpc-id> --query GroupId --output text)",
            "#   aws ec2 authorize-security-group-ingress --group-id $SG --protocol all --source-group $SG",
            "#   aws ec2 authorize-security-group-ingress --group-id $SG --protocol tcp --port 22 --cidr {ssh_cidr}",
            "# The placement group must exist first (one zone, strategy cluster):",
            "#   aws ec2 create-placement-group --strategy cluster --group-name {name}",
            "# Render with --subnet/--security-group (or replace SubnetId/Groups), then from the repository root:",
            "#   ray get-auth-token --generate   # once: ~/{token}, copied to every node; Ray's token auth is on",
            "#   ray up clusters/aws-g6e.yaml && ray dashboard clusters/aws-g6e.yaml &   # job API tunnelled to localhost:8265",
            "#   RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m launcher run <recipe>"],
    "kuberay": ["# Needs KubeRay >= 1.5.1 (group labels, authOptions), the NVIDIA and EFA device plugins, GPU nodes labelled by switch,",
                "# and a network plugin that enforces NetworkPolicy:",
                "#   kubectl label node <node> ringleader.io/leaf=leaf0",
                "#   kubectl apply -f clusters/kuberay.yaml",
                "#   kubectl port-forward service/{name}-head-svc 8265:8265 &",
                "#   export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(kubectl get secret {name} -o jsonpath='{{.data.auth_token}}' | base64 -d)",
                "#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m launcher run <recipe>"],
    "local": ["# A real autoscaler on this machine (fake 8-GPU hosts), token auth on, dashboard on loopback:",
              "#   ray get-auth-token --generate   # once, writes ~/{token}",
              "#   RAY_AUTH_MODE=token RAY_FAKE_CLUSTER=1 ray start --head --dashboard-host=127.0.0.1 --autoscaling-config=clusters/local-autoscaling.yaml"],
}
"""Header lines per provider."""


def _instance(gpu_type: str) -> InstanceType:
    if gpu_type not in AWS_INSTANCES:
        raise ConfigError(f"gpu_type {gpu_type!r} has no known host type; known: {', '.join(AWS_INSTANCES)}")
    return AWS_INSTANCES[gpu_type]


def _runtime_dependencies() -> list[str]:
    """Names of the project's dependencies (pyproject.toml) that the Ray image lacks; versions come from the lock."""
    return [r.name for r in lock.project_dependencies() if r.name != "ray"]
