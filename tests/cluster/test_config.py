"""Cluster YAML: bad input gets an error that names the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import load_cluster_config, parse_cluster_config
from cluster.launcher import check_gpus, plan_instances
from engine.errors import ConfigError

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_shipped_configs_load():
    cfg = load_cluster_config(DEPLOY / "local.yaml")
    assert cfg.mode == "disagg" and cfg.device == "cpu"
    assert [p.role for p in plan_instances(cfg)] == ["prefill", "decode"]
    for path in DEPLOY.glob("*.yaml"):
        if "kuberay" in path.name or "ray-cluster" in path.name:
            continue
        assert load_cluster_config(path).num_gpus >= 0, path


def test_malformed_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: smollm2-135m\n prefill: [\n")
    with pytest.raises(ConfigError, match=r"malformed YAML at line \d+"):
        load_cluster_config(bad)


def test_missing_file():
    with pytest.raises(ConfigError, match="no such cluster config"):
        load_cluster_config("/nonexistent/cluster.yaml")


@pytest.mark.parametrize("data, field", [
    ({"prefill": {"instancs": 1}}, "prefill.instancs: unknown key"),
    ({"decod": {}}, "decod: unknown key"),
    ({"kv_transfer": {"codec": "zip"}}, "kv_transfer.codec='zip'"),
    ({"device": "tpu"}, "device: 'tpu' is not one of"),
    ({"prefill": {"tp": "two"}}, "prefill.tp: expected int"),
    ({"prefill": {"tp": 0}}, "prefill.tp=0"),
    ({"decode": {"instances": 0}}, "mode: disagg needs"),
    ({"slo": {"ttft_s": -1}}, "slo.ttft_s"),
    ({"kv_transfer": {"link_gbps": 0}}, "kv_transfer.link_gbps=0"),
    ({"model": {"dtype": "float8"}}, "model.dtype: unknown dtype"),
    ({"model": {"name": "gpt-17"}}, "model.name"),
    ({"engine": {"switch_interval_ms": 0}}, "engine.switch_interval_ms=0"),
])
def test_bad_values_name_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        cfg = parse_cluster_config(data)
        cfg.model.source  # the model section is checked when its source is built
    assert field in str(err.value)


def test_more_gpus_than_the_cluster_has():
    cfg = parse_cluster_config({"device": "cuda", "model": {"name": "llama-3-8b", "weights": "dummy"},
                                "prefill": {"instances": 2, "tp": 2}, "decode": {"instances": 1, "tp": 2}})
    assert cfg.num_gpus == 6
    check_gpus(cfg, 6)
    with pytest.raises(ConfigError, match="needs 6 GPUs .* has 4"):
        check_gpus(cfg, 4)
