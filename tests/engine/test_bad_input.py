"""Malformed requests and configs fail early with an error that names the field at fault."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.errors import ConfigError, RequestError
from engine.presets import get_preset
from engine.request import SamplingParams
from engine.weights import ModelSource
from tests.engine.conftest import make_tiny_engine


@pytest.fixture
def engine():
    return make_tiny_engine(num_blocks=256)


def test_empty_prompt(engine):
    with pytest.raises(RequestError, match=r"^prompt: is empty"):
        engine.add_request([])
    assert not engine.has_unfinished


def test_empty_text_prompt(smollm2):
    _, _, tokenizer = smollm2   # text goes through the tokenizer; "" encodes to no tokens
    engine = LLMEngine(get_preset("tiny-gqa"), EngineConfig(num_blocks=16), tokenizer=tokenizer)
    with pytest.raises(RequestError, match=r"^prompt: is empty"):
        engine.add_request("")


def test_prompt_longer_than_the_context(engine):
    limit = get_preset("tiny-gqa").max_position_embeddings
    with pytest.raises(RequestError, match=rf"^prompt: {limit + 5} tokens .*{limit} tokens \(max_model_len\)"):
        engine.add_request([1] * (limit + 5))
    # max_model_len from the engine config lowers the model's own limit
    short = make_tiny_engine(num_blocks=256, max_model_len=100)
    with pytest.raises(RequestError, match=r"max_model_len"):
        short.add_request([1] * 100)
    assert not short.has_unfinished


@pytest.mark.parametrize("bad", [0, -3])
def test_max_tokens_not_positive(bad):
    with pytest.raises(RequestError, match=rf"^max_tokens={bad}: must be an integer >= 1"):
        SamplingParams(max_tokens=bad)


def test_token_ids_out_of_vocab(engine):
    with pytest.raises(RequestError, match=r"^prompt: token ids must be ints in \[0, 512\)"):
        engine.add_request([1, 2, 512])


@pytest.mark.parametrize("field,kwargs", [("temperature", {"temperature": -1.0}),
                                          ("top_k", {"top_k": -1}), ("top_p", {"top_p": 0.0})])
def test_bad_sampling_params(field, kwargs):
    with pytest.raises(RequestError, match=rf"^{field}="):
        SamplingParams(**kwargs)


def test_unknown_model_preset():
    with pytest.raises(ConfigError, match=r"^model.name: unknown preset 'llama-9-1t'.*llama-3-8b"):
        get_preset("llama-9-1t")
    with pytest.raises(ConfigError, match=r"^model.name: .*'llama-9-1t'"):
        ModelSource("llama-9-1t")
    with pytest.raises(ConfigError, match=r"^model.name: .*'llama-9-1t'"):
        ModelSource("llama-9-1t", "dummy").model_config()


def test_real_weights_for_a_shape_only_preset():
    with pytest.raises(ConfigError, match=r"^model.name: .*weights: dummy"):
        ModelSource("llama-3-8b")


@pytest.mark.parametrize("kwargs,field", [({"block_size": 12}, "block_size"), ({"max_num_seqs": 0}, "max_num_seqs"),
                                          ({"gpu_memory_fraction": 1.5}, "gpu_memory_fraction"),
                                          ({"attention_backend": "flash9"}, "attention_backend")])
def test_bad_engine_config(kwargs, field):
    with pytest.raises(ConfigError, match=rf"^{field}="):
        make_tiny_engine(**kwargs) if field == "attention_backend" else EngineConfig(**kwargs)


def test_unknown_policy():
    with pytest.raises(RequestError, match=r"^policy='fifo'"):
        make_tiny_engine("fifo")
