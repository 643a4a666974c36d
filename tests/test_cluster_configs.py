"""Cluster configs: reproducible from the recipe, sized for it, and accepted (or rejected) by Ray, KubeRay and EC2's model."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

from launcher.cli import main
from launcher.cluster_configs.crd import crd
from launcher.cluster_configs.render import CHECKED_IN, GPU_LABEL, LEAF_LABEL, ClusterOptions, Sizing, render, validate
from launcher.cluster_configs.validate import check_file
from launcher.recipe import Recipe
from topology.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "clusters/recipes/llama3-8b-4194k.yaml"


@pytest.fixture(scope="module")
def recipe() -> Recipe:
    return Recipe.load(ROOT / RECIPE, check_paths=False)


@pytest.mark.parametrize("path", sorted(CHECKED_IN))
def test_checked_in_config_equals_fresh_render(path, tmp_path, monkeypatch):
    recipe_path, provider = CHECKED_IN[path]
    monkeypatch.chdir(ROOT)
    out = tmp_path / Path(path).name
    assert main(["clusters", "render", recipe_path, "--provider", provider, "-o", str(out)]) == 0
    assert out.read_bytes() == (ROOT / path).read_bytes(), f"{path} is stale: re-run `ringleader clusters render {recipe_path} --provider {provider} -o {path}`"


@pytest.mark.parametrize("path", sorted(CHECKED_IN))
def test_checked_in_config_passes_rays_validation(path):
    report = check_file(ROOT / path)
    validate(report.main, source=path)
    assert main(["clusters", "validate", str(ROOT / path)]) == 0


@pytest.mark.parametrize("provider", ["aws", "kuberay", "local"])
def test_render_reports_exactly_what_it_wrote(provider, tmp_path, capsys):
    out = tmp_path / "c.yaml"
    assert main(["clusters", "render", str(ROOT / RECIPE), "--provider", provider, "-o", str(out)]) == 0
    said = capsys.readouterr().out
    cfg = next(d for d in yaml.safe_load_all(out.read_text()) if d.get("kind") == "RayCluster" or "available_node_types" in d)
    if provider == "kuberay":
        groups = cfg["spec"]["workerGroupSpecs"]
        most = sum(g["maxReplicas"] for g in groups)
        gpus = {g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for g in groups}
        stages = dict(kv.split("=") for kv in cfg["metadata"]["annotations"]["ringleader.io/stage-hosts"].split(","))
    else:
        workers = [t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]]
        most = min(cfg["max_workers"], sum(t["max_workers"] for t in workers))
        gpus = {t["resources"]["GPU"] for t in workers}
        stages = cfg["metadata"]["ringleader"]["stage_hosts"]
    assert f"up to {most} hosts of {gpus.pop()} GPUs" in said
    for stage, hosts in stages.items():
        assert f"{stage}={hosts}" + (" (does not fit)" if int(hosts) > most else "") in said
    if provider == "local":  # 4 fake hosts on this machine; the 512-GPU stages cannot run on them, and it says so
        assert most == 4 and "524K=64 (does not fit)" in said and "262K=4," in said


def test_recipe_sizes_hosts_per_stage(recipe):
    size = Sizing.from_recipe(recipe, 8)
    assert size.stage_hosts == {"65K": 1, "262K": 4, "524K": 64, "1048K": 64, "4191K": 64}
    assert size.max_hosts == 64
    assert size.upscaling_speed == 16.0  # 4 -> 64 hosts in one request


def test_aws_config_is_sized_and_networked_for_the_recipe(recipe):
    cfg = render(recipe, "aws")
    worker = cfg["available_node_types"]["ray.worker.g6e.48xlarge"]
    assert (worker["min_workers"], worker["max_workers"], cfg["max_workers"]) == (0, 64, 64)
    assert worker["resources"] == {"CPU": 192, "GPU": 8}
    assert worker["labels"][GPU_LABEL] == "L40S"
    node = worker["node_config"]
    assert node["InstanceType"] == "g6e.48xlarge"
    assert node["Placement"]["GroupName"] == cfg["cluster_name"]
    assert [ni["InterfaceType"] for ni in node["NetworkInterfaces"]] == ["efa"] * 4
    assert [ni["NetworkCardIndex"] for ni in node["NetworkInterfaces"]] == [0, 1, 2, 3]
    assert cfg["idle_timeout_minutes"] > 0 and cfg["upscaling_speed"] == 16.0
    assert any("pip install" in c and "ringleader" in c for c in cfg["setup_commands"])
    # Ray's own preparation (provider defaults merged) keeps our sizing and validates.
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    assert prepared["available_node_types"]["ray.worker.g6e.48xlarge"]["max_workers"] == 64


def test_site_options_reach_the_aws_config(recipe):
    cfg = render(recipe, "aws", ClusterOptions(region="us-west-2", availability_zone="us-west-2b", subnet_id="subnet-0a1b2c3d", security_group_id="sg-0d1e2f3a"))
    assert cfg["provider"]["region"] == "us-west-2"
    nis = cfg["available_node_types"]["ray.worker.g6e.48xlarge"]["node_config"]["NetworkInterfaces"]
    assert {ni["SubnetId"] for ni in nis} == {"subnet-0a1b2c3d"} and all(ni["Groups"] == ["sg-0d1e2f3a"] for ni in nis)


def test_kuberay_groups_cover_peak_gpus_with_leaf_labels(recipe):
    cr = render(recipe, "kuberay")
    assert (cr["apiVersion"], cr["kind"]) == ("ray.io/v1", "RayCluster")
    assert cr["spec"]["enableInTreeAutoscaling"] is True
    groups = cr["spec"]["workerGroupSpecs"]
    assert len(groups) == 8
    for i, g in enumerate(groups):
        assert g["minReplicas"] == 0 and g["maxReplicas"] == 8
        assert g["labels"][LEAF_LABEL] == f"leaf{i}"
        assert g["template"]["spec"]["nodeSelector"][LEAF_LABEL] == f"leaf{i}"
        assert g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    # What Ray's in-tree KubeRay autoscaler will see: 512 GPUs, each group's Ray nodes labelled by leaf.
    derived = _derive_autoscaling_config_from_ray_cr(copy.deepcopy(cr))
    workers = {k: v for k, v in derived["available_node_types"].items() if k != "headgroup"}
    assert sum(v["max_workers"] * v["resources"]["GPU"] for v in workers.values()) == recipe.peak_gpus
    assert sorted(v["labels"][LEAF_LABEL] for v in workers.values()) == [f"leaf{i}" for i in range(8)]
    assert derived["idle_timeout_minutes"] == 5.0


def test_local_config_is_read_as_is_by_the_fake_autoscaler(recipe):
    cfg = render(recipe, "local")
    validate_config(copy.deepcopy(cfg))  # Ray's monitor validates the file as written
    worker = cfg["available_node_types"]["l40s-8x"]
    assert worker["resources"]["GPU"] == 8 and worker["max_workers"] == 4


def _aws_config() -> dict:
    return yaml.safe_load((ROOT / "clusters/aws-g6e.yaml").read_text())


def test_unknown_key_is_rejected_with_rays_message():
    cfg = _aws_config()
    cfg["available_node_types"]["ray.worker.g6e.48xlarge"]["max_wokers"] = 64
    with pytest.raises(ConfigError, match=r"Additional properties are not allowed \('max_wokers' was unexpected\)"):
        validate(cfg)


def test_min_workers_above_max_is_rejected_with_rays_message():
    cfg = _aws_config()
    cfg["available_node_types"]["ray.worker.g6e.48xlarge"]["min_workers"] = 65
    with pytest.raises(ConfigError, match="global `max_workers` is smaller than the sum of `min_workers`"):
        validate(cfg)


def test_node_type_min_above_its_own_max_is_rejected():
    cfg = _aws_config()
    cfg["available_node_types"]["ray.worker.g6e.48xlarge"].update(min_workers=8, max_workers=4)
    with pytest.raises(ConfigError, match=r"min_workers \(8\) > max_workers \(4\)"):
        validate(cfg)


@pytest.mark.parametrize("mutate, message", [
    (lambda cr: cr["spec"]["workerGroupSpecs"][0].update(minReplicas=9), r"minReplicas \(9\) > maxReplicas \(8\)"),
    (lambda cr: cr.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
    (lambda cr: cr["spec"].update(enableInTreeAutoscaling=False), "enableInTreeAutoscaling"),
    (lambda cr: cr["spec"]["workerGroupSpecs"][1].update(maxReplica=3), "unknown field"),
    (lambda cr: cr["spec"]["workerGroupSpecs"][2].update(labels={"bad label!": "x"}), "Ray's KubeRay autoscaler rejects it"),
    # Inside pod templates, where a typo would otherwise vanish when the API server prunes it.
    (lambda cr: cr["spec"]["workerGroupSpecs"][3]["template"]["spec"]["containers"][0].update(imagePullPolcy="Always"),
     r"spec.workerGroupSpecs.3.template.spec.containers.0.imagePullPolcy: unknown field 'imagePullPolcy' \(KubeRay v1"),
    (lambda cr: cr["spec"]["headGroupSpec"]["template"]["spec"].update(tolerations="all"), r"tolerations: 'all' is not of type 'array'"),
    (lambda cr: cr["spec"].update(authOptions={"mode": "on"}), r"spec.authOptions.mode: 'on' is not one of \['disabled', 'token'\]"),
])
def test_broken_raycluster_is_rejected(recipe, mutate, message):
    cr = render(recipe, "kuberay")
    mutate(cr)
    with pytest.raises(ConfigError, match=message):
        validate(cr)


def test_crd_copy_names_its_kuberay_release():
    copy_ = crd()
    assert copy_["kuberay_version"].startswith("v1.") and len(copy_["commit"]) == 40
    assert copy_["source"].endswith("helm-chart/kuberay-operator/crds/ray.io_rayclusters.yaml")
    assert "authOptions" in copy_["openAPIV3Schema"]["properties"]["spec"]["properties"]


def test_misspelt_ec2_key_is_rejected_at_its_line(tmp_path, capsys):
    text = (ROOT / "clusters/aws-g6e.yaml").read_text()
    bad = tmp_path / "aws.yaml"
    bad.write_text(text.replace("      InstanceType: g6e.48xlarge", "      InstanceTyp: g6e.48xlarge"))
    line = bad.read_text().splitlines().index("      InstanceTyp: g6e.48xlarge") + 1
    assert main(["clusters", "validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{bad}:{line}:" in err and "unknown key 'InstanceTyp'" in err and "did you mean 'InstanceType'" in err
    # Nested too: a typo inside an EFA interface.
    cfg = _aws_config()
    cfg["available_node_types"]["ray.worker.g6e.48xlarge"]["node_config"]["NetworkInterfaces"][2]["InterfaceTyp"] = "efa"
    with pytest.raises(ConfigError, match="unknown key 'InterfaceTyp'.*did you mean 'InterfaceType'"):
        validate(cfg)
    cfg = _aws_config()
    cfg["available_node_types"]["ray.worker.g6e.48xlarge"]["node_config"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] = "big"
    with pytest.raises(ConfigError, match="EC2 RunInstances would refuse it: Invalid type for parameter BlockDeviceMappings"):
        validate(cfg)


def test_cli_bad_input_exits_2_without_a_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    cfg = _aws_config()
    cfg["bogus"] = 1
    bad.write_text(yaml.safe_dump(cfg))
    assert main(["clusters", "validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ringleader: error:") and "bogus" in err and "\n" not in err
    recipe = yaml.safe_load((ROOT / RECIPE).read_text())
    recipe["gpu_type"] = "TPUv9"
    rpath = tmp_path / "r.yaml"
    rpath.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out.yaml"
    assert main(["clusters", "render", str(rpath), "--provider", "aws", "-o", str(out)]) == 2
    assert "TPUv9" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("flags, expected", [
    (["--provider", "aws", "--region", "us east"], "--region is 'us east'; give an AWS region such as us-east-1"),
    (["--provider", "aws", "--zone", "us-west-2a"], "--zone 'us-west-2a' is not a zone of --region 'us-east-1'"),
    (["--provider", "aws", "--subnet", "10.0.0.0/24"], "--subnet is '10.0.0.0/24'; give a subnet id"),
    (["--provider", "aws", "--security-group", "default"], "--security-group is 'default'; give a security group id"),
    (["--provider", "aws", "--ssh-cidr", "my-laptop"], "--ssh-cidr is 'my-laptop'; give an address block"),
    (["--provider", "kuberay", "--namespace", "ML_Team"], "--namespace is 'ML_Team'; give a Kubernetes namespace"),
    (["--provider", "kuberay", "--image", ""], "--image is ''; give a container image reference"),
    (["--provider", "kuberay", "--hosts-per-leaf", "0"], "--hosts-per-leaf is 0"),
])
def test_site_settings_in_a_form_aws_or_kubernetes_refuses_exit_2_without_a_file(tmp_path, capsys, flags, expected):
    """A typo in a site setting surfaces when the config is rendered, not when the cluster is launched."""
    out = tmp_path / "out.yaml"
    assert main(["clusters", "render", RECIPE, *flags, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ringleader: error: ") and "\n" not in err and expected in err, err
    assert not out.exists()


def test_region_alone_takes_its_first_zone(tmp_path):
    out = tmp_path / "aws.yaml"
    assert main(["clusters", "render", RECIPE, "--provider", "aws", "--region", "eu-central-1", "-o", str(out)]) == 0
    provider = yaml.safe_load(out.read_text())["provider"]
    assert (provider["region"], provider["availability_zone"]) == ("eu-central-1", "eu-central-1a")


def test_ssh_open_to_every_address_renders_with_a_warning(tmp_path, capsys):
    out = tmp_path / "aws.yaml"
    assert main(["clusters", "render", RECIPE, "--provider", "aws", "--ssh-cidr", "0.0.0.0/0", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "ringleader: warning: --ssh-cidr 0.0.0.0/0 lets any address reach the nodes' SSH port" in err and out.exists()
    assert main(["clusters", "render", RECIPE, "--provider", "aws", "--ssh-cidr", "203.0.113.7/32", "-o", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err
