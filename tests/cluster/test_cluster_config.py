"""cluster.yaml: valid for Ray's cluster launcher (offline) and secure by default (issue #4).

Validation uses the schema shipped in the ray wheel and Ray's own config preparation. Security is
checked by `security_problems`, which every mutation test below proves able to fail, and by running
Ray's real AWS bootstrap against moto's in-process EC2/IAM to see which ingress rules a `ray up`
would leave (no cloud, no network).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
DASHBOARD_PORT = 8265  # dashboard and Jobs API
SSH_PORT = 22
WORLD = ("0.0.0.0/0", "::/0")
JUSTIFIED = "justified:"  # an IpRanges Description that starts so may open a range to the world


def load_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


# ---------------------------------------------------------------------------------------------
# The checker
# ---------------------------------------------------------------------------------------------


def _covers(rule: dict, port: int) -> bool:
    if str(rule.get("IpProtocol")) == "-1":
        return True
    low, high = rule.get("FromPort", -1), rule.get("ToPort", -1)
    return low == -1 or low <= port <= high


def ingress_problems(ip_permissions: list[dict]) -> list[str]:
    """Problems in EC2 ingress rules: 8265 reachable from any address range, or a world-open range
    whose Description does not start with "justified:" (SSH may never be world-open)."""
    problems = []
    for rule in ip_permissions:
        ranges = [(r.get("CidrIp"), r.get("Description", "")) for r in rule.get("IpRanges", [])]
        ranges += [(r.get("CidrIpv6"), r.get("Description", "")) for r in rule.get("Ipv6Ranges", [])]
        for cidr, description in ranges:
            if _covers(rule, DASHBOARD_PORT):
                problems.append(f"port {DASHBOARD_PORT} (dashboard/Jobs API) open to {cidr}")
            if cidr in WORLD or ipaddress.ip_network(cidr).prefixlen == 0:
                if _covers(rule, SSH_PORT) or not description.startswith(JUSTIFIED):
                    problems.append(f"{rule.get('IpProtocol')}:{rule.get('FromPort')} open to {cidr}")
    return problems


def _all_strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in [str(key), *_all_strings(value)]]
    if isinstance(node, list):
        return [s for item in node for s in _all_strings(item)]
    return [str(node)]


def _container_env(cfg: dict) -> dict[str, str]:
    """Environment variables set on every container by docker.run_options (`--env K=V`)."""
    env = {}
    for option in cfg.get("docker", {}).get("run_options", []):
        words = shlex.split(option)
        for flag, value in zip(words, words[1:]):
            if flag in ("--env", "-e") and "=" in value:
                key, _, val = value.partition("=")
                env[key] = val
    return env


def security_problems(cfg: dict) -> list[str]:
    """Everything in a cluster config that breaks catdog's security defaults, as readable lines."""
    problems = ingress_problems(cfg.get("provider", {}).get("security_group", {}).get("IpPermissions", []))
    for name, node_type in cfg["available_node_types"].items():
        if not node_type["node_config"].get("SecurityGroupIds"):
            problems.append(f"{name}: no SecurityGroupIds, so Ray creates a group with SSH open to 0.0.0.0/0")
    head_start = " ".join(cfg.get("head_start_ray_commands", []))
    for host in re.findall(r"--dashboard-host[= ](\S+)", head_start):
        if host not in ("127.0.0.1", "localhost"):
            problems.append(f"dashboard listens on {host}, beyond the head's loopback")
    env = _container_env(cfg)
    for role in ("head", "worker"):
        start = " ".join(cfg.get(f"{role}_start_ray_commands", []))
        if env.get("RAY_AUTH_MODE") != "token" and "RAY_AUTH_MODE=token" not in start:
            problems.append(f"{role} nodes start Ray without RAY_AUTH_MODE=token")
    token_path = env.get("RAY_AUTH_TOKEN_PATH", "")
    mounts = cfg.get("file_mounts", {})
    if not any(token_path.startswith(remote.rstrip("/") + "/") or token_path == remote for remote in mounts):
        problems.append(f"RAY_AUTH_TOKEN_PATH {token_path!r} is not a file_mounts path: nodes would lack the token")
    text = " ".join(_all_strings(cfg))
    if "RAY_AUTH_MODE=disabled" in text:
        problems.append("token authentication is disabled somewhere")
    if re.search(r"RAY_AUTH_TOKEN=\S", text):
        problems.append("a token literal is written into the config (use the mounted token file)")
    for world in WORLD:
        if world in text and not any(
            world == r.get("CidrIp", r.get("CidrIpv6")) and r.get("Description", "").startswith(JUSTIFIED)
            for rule in cfg.get("provider", {}).get("security_group", {}).get("IpPermissions", [])
            for r in rule.get("IpRanges", []) + rule.get("Ipv6Ranges", [])
        ):
            problems.append(f"{world} appears without a justified rule")
    return sorted(set(problems))


# ---------------------------------------------------------------------------------------------
# Validity
# ---------------------------------------------------------------------------------------------


def test_cluster_yaml_matches_the_schema_shipped_in_ray():
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(load_config(), json.loads(schema_path.read_text()))


def test_cluster_yaml_passes_rays_own_preparation_and_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(load_config())
    validate_config(prepared)
    assert prepared["available_node_types"]["ray.head.default"]["max_workers"] == 0


def test_schema_validation_can_fail():
    broken = load_config()
    broken["idle_timeout_minutes"] = "ten"
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json.loads(schema_path.read_text()))


def test_node_types_head_takes_no_tasks_gpu_workers_autoscale_from_zero():
    cfg = load_config()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert "--num-cpus=0" in " ".join(cfg["head_start_ray_commands"])
    gpu = types["ray.worker.gpu"]
    assert re.match(r"g[56]\.", gpu["node_config"]["InstanceType"])
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    cpu = types["ray.worker.cpu"]
    assert cpu["min_workers"] == 0
    assert cfg["idle_timeout_minutes"] > 0
    assert sum(t.get("max_workers", 0) for t in types.values()) <= cfg["max_workers"]


def test_image_is_the_ray_gpu_image_of_the_pinned_ray_on_python_311():
    cfg = load_config()
    assert cfg["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert "ray-ml" not in " ".join(_all_strings(cfg))


def test_setup_installs_every_pinned_dependency_with_cuda_tensorflow():
    pinned = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    setup = " ".join(load_config()["setup_commands"])
    installed = dict(re.findall(r'"([A-Za-z0-9_.\-\[\],]+)==([^"]+)"', setup))
    for requirement in pinned:
        name, version = requirement.split("==")
        if name == "tensorflow":
            name = "tensorflow[and-cuda]"
        assert installed.get(name) == version, f"{requirement} not installed as {name}=={version} on the cluster"


# ---------------------------------------------------------------------------------------------
# Security
# ---------------------------------------------------------------------------------------------


def test_shipped_cluster_yaml_has_no_security_problems():
    cfg = load_config()
    assert security_problems(cfg) == []
    env = _container_env(cfg)
    assert env["RAY_AUTH_MODE"] == "token"
    assert str(DASHBOARD_PORT) not in " ".join(_all_strings(cfg["provider"]))


def _open_dashboard(cfg):
    cfg["provider"]["security_group"] = {
        "GroupName": "x",
        "IpPermissions": [
            {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}
        ],
    }


def _open_everything_to_world(cfg):
    cfg["provider"]["security_group"] = {
        "IpPermissions": [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0", "Description": "justified: no"}]}]
    }


def _world_ssh(cfg):
    cfg["provider"]["security_group"] = {
        "IpPermissions": [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    }


def _world_https_unjustified(cfg):
    cfg["provider"]["security_group"] = {
        "IpPermissions": [{"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}]
    }


def _dashboard_on_all_interfaces(cfg):
    cfg["head_start_ray_commands"][-1] = cfg["head_start_ray_commands"][-1].replace(
        "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"
    )


def _no_token_mode(cfg):
    cfg["docker"]["run_options"] = [o for o in cfg["docker"]["run_options"] if "RAY_AUTH_MODE" not in o]


def _auth_disabled(cfg):
    cfg["worker_start_ray_commands"][-1] = "RAY_AUTH_MODE=disabled " + cfg["worker_start_ray_commands"][-1]


def _token_literal(cfg):
    cfg["docker"]["run_options"].append("--env RAY_AUTH_TOKEN=0123456789abcdef")


def _token_not_mounted(cfg):
    cfg["file_mounts"] = {}


def _worker_without_security_group(cfg):
    del cfg["available_node_types"]["ray.worker.cpu"]["node_config"]["SecurityGroupIds"]


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (_open_dashboard, "port 8265"),
        (_open_everything_to_world, "port 8265"),
        (_world_ssh, "tcp:22 open to 0.0.0.0/0"),
        (_world_https_unjustified, "tcp:443 open to ::/0"),
        (_dashboard_on_all_interfaces, "dashboard listens on 0.0.0.0"),
        (_no_token_mode, "without RAY_AUTH_MODE=token"),
        (_auth_disabled, "disabled"),
        (_token_literal, "token literal"),
        (_token_not_mounted, "not a file_mounts path"),
        (_worker_without_security_group, "ray.worker.cpu: no SecurityGroupIds"),
    ],
)
def test_checker_flags_each_insecure_change(mutate, expected):
    cfg = load_config()
    mutate(cfg)
    problems = security_problems(cfg)
    assert any(expected in p for p in problems), problems


def test_checker_accepts_a_justified_world_open_non_ssh_port():
    cfg = load_config()
    cfg["provider"]["security_group"] = {
        "IpPermissions": [
            {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443,
             "IpRanges": [{"CidrIp": "0.0.0.0/0", "Description": "justified: public HTTPS for a Serve app"}]}
        ]
    }
    assert security_problems(cfg) == []


def test_rays_default_security_group_opens_ssh_to_the_world():
    """Why every node type names its own group: Ray's auto-created one allows 22 from anywhere."""
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    rules = _create_default_inbound_rules({"sg-1"})
    assert any("tcp:22 open to 0.0.0.0/0" in p for p in ingress_problems(rules))


# ---------------------------------------------------------------------------------------------
# What `ray up` would do: Ray's real AWS bootstrap against moto's in-process EC2 and IAM
# ---------------------------------------------------------------------------------------------


def _documented_ingress(group_id: str, my_cidr: str) -> list[dict]:
    """The `aws ec2 authorize-security-group-ingress` commands from cluster.yaml's comments, as rules."""
    rules = []
    for line in CLUSTER_YAML.read_text().splitlines():
        command = line.lstrip("# ")
        if not command.startswith("aws ec2 authorize-security-group-ingress"):
            continue
        words = shlex.split(command)
        args = dict(zip(words[3::2], words[4::2]))
        rule: dict = {"IpProtocol": args["--protocol"]}
        if "--port" in args:
            rule["FromPort"] = rule["ToPort"] = int(args["--port"])
        if "--cidr" in args:
            rule["IpRanges"] = [{"CidrIp": args["--cidr"].replace("YOUR_IP/32", my_cidr)}]
        if "--source-group" in args:
            rule["UserIdGroupPairs"] = [{"GroupId": group_id}]
        rules.append(rule)
    assert len(rules) >= 2, "cluster.yaml documents how to create the security group"
    return rules


@pytest.fixture
def fake_aws(tmp_path, monkeypatch):
    """moto's in-process AWS: a default VPC with subnets, Ray's default head instance profile."""
    moto = pytest.importorskip("moto")
    import boto3
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.aws import utils as aws_utils

    monkeypatch.setenv("HOME", str(tmp_path))  # the bootstrap writes its SSH key to ~/.ssh
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    for cached in (aws_utils.resource_cache, aws_utils.client_cache, aws_config._get_subnets_or_die):
        cached.cache_clear()
    with moto.mock_aws():
        region = load_config()["provider"]["region"]
        iam = boto3.client("iam", region_name=region)
        # Pre-created so the bootstrap does not wait 15 s for IAM propagation.
        iam.create_role(RoleName="ray-autoscaler-v1", AssumeRolePolicyDocument="{}")
        iam.create_instance_profile(InstanceProfileName="ray-autoscaler-v1")
        iam.add_role_to_instance_profile(InstanceProfileName="ray-autoscaler-v1", RoleName="ray-autoscaler-v1")
        yield boto3.client("ec2", region_name=region)
    for cached in (aws_utils.resource_cache, aws_utils.client_cache, aws_config._get_subnets_or_die):
        cached.cache_clear()


def _effective_ingress(ec2, group_ids) -> list[dict]:
    groups = ec2.describe_security_groups(GroupIds=sorted(set(group_ids)))["SecurityGroups"]
    return [rule for group in groups for rule in group["IpPermissions"]]


def test_ray_up_bootstrap_keeps_only_the_documented_narrow_ingress(fake_aws):
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.util import prepare_config

    ec2 = fake_aws
    vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    group = ec2.create_security_group(GroupName="catdog-ray", Description="catdog Ray", VpcId=vpc)["GroupId"]
    for rule in _documented_ingress(group, "203.0.113.7/32"):
        ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[rule])
    groups_before = {g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]}

    cfg = load_config()
    for node_type in cfg["available_node_types"].values():
        node_type["node_config"]["SecurityGroupIds"] = [group]  # what the user does in step 2
    bootstrapped = bootstrap_aws(prepare_config(cfg))

    used = [g for t in bootstrapped["available_node_types"].values() for g in t["node_config"]["SecurityGroupIds"]]
    assert set(used) == {group}
    assert {g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]} == groups_before
    ingress = _effective_ingress(ec2, used)
    assert ingress_problems(ingress) == []
    ssh = [r for r in ingress if r.get("FromPort") == SSH_PORT]
    assert [r["CidrIp"] for rule in ssh for r in rule["IpRanges"]] == ["203.0.113.7/32"]

    # Control: the same file without SecurityGroupIds gets Ray's own group, open to the world.
    plain = load_config()
    for node_type in plain["available_node_types"].values():
        del node_type["node_config"]["SecurityGroupIds"]
    control = bootstrap_aws(prepare_config(plain))
    control_groups = [g for t in control["available_node_types"].values() for g in t["node_config"]["SecurityGroupIds"]]
    assert any("open to 0.0.0.0/0" in p for p in ingress_problems(_effective_ingress(ec2, control_groups)))
