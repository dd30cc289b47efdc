"""Named model shapes for dummy-weight speed work and tests (real configs, random values)."""

from __future__ import annotations

from engine.config import ModelConfig
from engine.errors import ConfigError

_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

PRESETS: dict[str, ModelConfig] = {
    "llama-3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                              num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                              rope_theta=500000.0, max_position_embeddings=8192, eos_token_ids=(128001, 128009),
                              name="llama-3-8b"),
    "llama-3.1-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                                rope_theta=500000.0, rope_scaling=_LLAMA3_SCALING, max_position_embeddings=131072,
                                eos_token_ids=(128001, 128008, 128009), name="llama-3.1-8b"),
    "llama-2-13b": ModelConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
                               num_heads=40, num_kv_heads=40, head_dim=128, rms_norm_eps=1e-5,
                               rope_theta=10000.0, max_position_embeddings=4096, eos_token_ids=(2,),
                               name="llama-2-13b"),
    "qwen2.5-7b": ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                              num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6,
                              rope_theta=1000000.0, max_position_embeddings=32768, attention_bias=True,
                              eos_token_ids=(151645, 151643), name="qwen2.5-7b"),
    "mistral-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
                              num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                              rope_theta=1000000.0, max_position_embeddings=32768, eos_token_ids=(2,),
                              name="mistral-7b"),
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                                num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
                                rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
                                eos_token_ids=(2,), name="smollm2-135m"),
    # Small shapes for CPU tests of GQA and tensor parallelism (8 query / 4 KV heads).
    "tiny-gqa": ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2,
                            num_heads=8, num_kv_heads=4, head_dim=16, rope_theta=10000.0,
                            max_position_embeddings=1024, eos_token_ids=(0,), name="tiny-gqa"),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"model.name: unknown preset {name!r}; choose one of {sorted(PRESETS)}, "
                          "or give a path to a local model directory or config.json")
    return PRESETS[name]
