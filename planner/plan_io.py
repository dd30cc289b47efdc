"""Plans on disk: a cluster YAML (the schema cluster.config loads, nothing added) whose header
comments carry the prediction, and a sidecar JSON with the curve and the runners-up."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from cluster.config import ClusterConfig, parse_cluster_config


def config_to_dict(config: ClusterConfig) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    out = parse_cluster_config(d)  # the round trip must hold: what we write is what loads
    if out != config:
        raise AssertionError("cluster config did not survive a round trip through a dict")
    return d


def write_plan(path: Path, config: ClusterConfig, header: list[str], sidecar: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    path.write_text("".join(f"# {line}\n" for line in header) + body)
    side = path.with_suffix(".json")
    side.write_text(json.dumps(sidecar, indent=2, default=str) + "\n")
    return side
