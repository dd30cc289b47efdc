"""Shared fixtures for cluster tests: real ShareGPT prompts and transformers' own greedy
outputs for them (the oracle), computed once per session."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from benchmarks.workloads import load_workload
from cluster.config import parse_cluster_config
from engine.weights import ModelSource, load_reference_model

NUM_PROMPTS = 8
NEW_TOKENS = 24


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return ModelSource("smollm2-135m").tokenizer()


@pytest.fixture(scope="session")
def prompts(tokenizer: Any) -> list[list[int]]:
    items = load_workload("sharegpt", NUM_PROMPTS, tokenizer, seed=7, max_prompt_tokens=200)
    return [tokenizer.encode(it.prompt) for it in items]


@pytest.fixture(scope="session")
def hf_outputs(prompts: list[list[int]]) -> list[list[int]]:
    """transformers' generate (greedy, fp32, CPU), cut at EOS like our engine."""
    model, _ = load_reference_model()
    outs = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
            outs.append(out[0, len(ids):].tolist())
    return outs


def cluster_config(**overrides: Any):
    """deploy/local.yaml's shape with small caches, plus overrides (nested dicts merge)."""
    base: dict[str, Any] = {
        "model": {"name": "smollm2-135m", "weights": "real", "dtype": "float32"},
        "device": "cpu", "mode": "disagg",
        "prefill": {"instances": 2, "max_batch_tokens": 256, "chunk_size": 128, "kv_blocks": 128},
        "decode": {"instances": 2, "max_batch_size": 8, "kv_blocks": 128},
        "kv_transfer": {"transport": "tcp", "codec": "raw", "timeout_s": 20},
        "engine": {"cpu_threads_per_instance": 1},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            base.setdefault(key, {}).update(value)
        else:
            base[key] = value
    return parse_cluster_config(base)


def assert_no_leaks(stats: dict[str, dict[str, Any]]) -> None:
    for name, s in stats.items():
        assert s["free_blocks"] == s["num_blocks"], f"{name} leaked {s['num_blocks'] - s['free_blocks']} blocks: {s}"
        assert s.get("handoffs", 0) == 0 and s.get("staged", 0) == 0, f"{name}: {s}"
        assert s["waiting"] == 0 and s["running"] == 0, f"{name}: {s}"
