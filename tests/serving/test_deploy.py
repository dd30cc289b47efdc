"""deploy/ is runnable as written: every cluster YAML loads and passes `splitserve serve
--dry-run`; the Ray launcher config passes Ray's own schema check; the KubeRay manifests have
the keys the operator needs and their entrypoints parse as splitserve commands whose cluster
YAMLs load; the job-submission script is valid bash."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.config import load_cluster_config, parse_cluster_config
from splitserve.cli import COMMANDS, main as splitserve_main

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CLUSTER_YAMLS = sorted(p for p in DEPLOY.glob("*.yaml") if not p.name.startswith("ray-cluster"))
KUBERAY = sorted((DEPLOY / "kuberay").glob("*.yaml"))


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_loads_and_dry_runs(path: Path, capsys: pytest.CaptureFixture[str]):
    config = load_cluster_config(path)
    assert splitserve_main(["serve", str(path), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["num_gpus"] == config.num_gpus and plan["max_inflight"] >= 1
    assert len(plan["instances"]) == config.prefill.instances + config.decode.instances


def test_gpu_shapes_cover_the_common_plans():
    shapes = {p.name: load_cluster_config(p) for p in CLUSTER_YAMLS}
    gpus = {name: c.num_gpus for name, c in shapes.items() if c.device == "cuda"}
    assert {1, 2, 4, 8} <= set(gpus.values()), gpus
    assert any(c.placement == "spread" for c in shapes.values())
    assert any(c.mode == "colocated" for c in shapes.values())
    for name, c in shapes.items():
        if c.device == "cuda":
            assert (c.model.name, c.model.weights) == ("llama-3-8b", "dummy"), name


def _parse_command(argv: list[str]) -> argparse.Namespace:
    """Parse `splitserve SUB ...` exactly as the CLI would, without running it."""
    assert argv[0] == "splitserve" and argv[1] in COMMANDS, argv
    module = importlib.import_module(COMMANDS[argv[1]][0])
    parser = argparse.ArgumentParser(prog=f"splitserve {argv[1]}")
    module.add_arguments(parser)
    return parser.parse_args(argv[2:])


def _config_at(path: str, config_maps: dict[str, str]) -> Any:
    """A cluster YAML as a pod sees it: /app is this checkout, /etc/splitserve a ConfigMap."""
    if path.startswith("/etc/splitserve/"):
        return parse_cluster_config(yaml.safe_load(config_maps[Path(path).name]), path)
    return load_cluster_config(ROOT / path.removeprefix("/app/"))


def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    containers = pod_template["spec"]["containers"]
    assert containers and all(c["image"] and c["name"] for c in containers)
    return containers


def _check_ray_cluster_spec(spec: dict[str, Any]) -> None:
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    _containers(head["template"])
    assert spec["workerGroupSpecs"], "no worker group"
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and group["replicas"] >= group.get("minReplicas", 0)
        assert group["maxReplicas"] >= group["replicas"]
        limits = _containers(group["template"])[0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifests(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    config_maps = {k: v for d in docs if d["kind"] == "ConfigMap" for k, v in d["data"].items()}
    kinds = set()
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"], doc
        kinds.add(doc["kind"])
        if doc["kind"] == "RayCluster":
            _check_ray_cluster_spec(doc["spec"])
        elif doc["kind"] == "RayJob":
            _check_ray_cluster_spec(doc["spec"]["rayClusterSpec"])
            args = _parse_command(shlex.split(doc["spec"]["entrypoint"]))
            config = _config_at(args.config, config_maps)
            head_gpus = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].get("num-gpus", "0")
            worker_gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                              * g["maxReplicas"] for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"])
            assert config.num_gpus <= worker_gpus + int(head_gpus), (config.num_gpus, worker_gpus)
        elif doc["kind"] == "RayService":
            _check_ray_cluster_spec(doc["spec"]["rayClusterConfig"])
            serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
            for app in serve_config["applications"]:
                module, _, attr = app["import_path"].partition(":")
                assert callable(getattr(importlib.import_module(module), attr))
                _config_at(app["args"]["config"], config_maps)
        elif doc["kind"] == "Service":
            assert doc["spec"]["selector"] and doc["spec"]["ports"]
        else:
            assert doc["kind"] == "ConfigMap", doc["kind"]
    assert kinds & {"RayCluster", "RayJob", "RayService"}
    if path.name == "raycluster.yaml":   # its header's commands are the documented way to use it
        for line in path.read_text().splitlines():
            if "splitserve " in line and line.lstrip("# ").startswith("splitserve"):
                _config_at(_parse_command(shlex.split(line.lstrip("# "))).config, config_maps)


def test_ray_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DEPLOY / "ray-cluster-aws.yaml").read_text())
    validate_config(prepare_config(config))   # what `ray up` checks before it starts anything
    assert config["head_node_type"] in config["available_node_types"]
    assert any("pip install" in c and "-e" in c for c in config["setup_commands"])
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert all(t["resources"].get("GPU", 0) >= 1 for t in workers)


def test_job_submit_script_is_valid_bash_and_names_real_configs():
    script = DEPLOY / "job-submit.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "ray job submit" in text and "--working-dir ." in text
    named = set(re.findall(r"deploy/[\w.-]+\.yaml", text))
    assert "deploy/local.yaml" in named
    for path in named:
        load_cluster_config(ROOT / path)


def test_app_builder_rejects_unknown_args():
    from serving.app import app_builder

    with pytest.raises(ValueError, match="config=PATH"):
        app_builder({"cfg": "deploy/local.yaml"})


def test_ci_workflow_runs_the_cpu_suite_and_the_gpu_job():
    workflow = yaml.safe_load((ROOT / ".github/workflows/ci.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))   # YAML 1.1 reads a bare `on` as True
    assert "push" in triggers
    cpu, gpu = workflow["jobs"]["cpu"], workflow["jobs"]["gpu"]
    assert cpu["runs-on"] == "ubuntu-latest" and any("pytest" in s.get("run", "") for s in cpu["steps"])
    assert "self-hosted" in gpu["runs-on"] and gpu["needs"] == "cpu"
    runs = "\n".join(s.get("run", "") for s in gpu["steps"])
    assert "-m gpu" in runs
    for path in re.findall(r"deploy/[\w.-]+\.(?:sh|yaml)", runs):
        assert (ROOT / path).exists(), path
    subprocess.run(["bash", "-n", str(DEPLOY / "slo-sweep.sh")], check=True)
