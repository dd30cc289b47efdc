"""Shared fixtures for the engine tests: the SmolLM2 weights, loaded once per session, and
engine builders for the real model and the fast `tiny-gqa` dummy shape."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.presets import get_preset
from engine.weights import ModelSource


@pytest.fixture(scope="session")
def smollm2() -> tuple[Any, dict[str, torch.Tensor], Any]:
    """(ModelConfig, HF-named state dict, tokenizer) of SmolLM2-135M-Instruct, loaded once."""
    source = ModelSource("smollm2-135m")
    return source.model_config(), source.state_dict(), source.tokenizer()


@pytest.fixture(scope="session")
def make_smollm2_engine(smollm2):
    model_config, weights, tokenizer = smollm2

    def build(policy: str = "continuous", **config: Any) -> LLMEngine:
        config.setdefault("num_blocks", 512)
        return LLMEngine(model_config, EngineConfig(**config), policy, weights, tokenizer)

    return build


def make_tiny_engine(policy: str = "continuous", **config: Any) -> LLMEngine:
    """tiny-gqa with dummy weights: a two-layer model that steps in about a millisecond."""
    return LLMEngine(get_preset("tiny-gqa"), EngineConfig(**config), policy)


@pytest.fixture(scope="session", autouse=True)
def _one_cpu_thread():
    """The engine tests run many small ops: one intra-op thread is as fast on an idle
    2-core machine, and avoids OpenMP spin-waits costing 5-7x when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
