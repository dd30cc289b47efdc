"""Frozen configuration objects for the model and the engine.

`ModelConfig` is our own view of a transformers config (Llama, Mistral, Qwen2, SmolLM2 all
map onto it); `EngineConfig` sizes the KV cache and the scheduler's limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype, field_name: str = "dtype") -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"{field_name}: unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or a dict like transformers' rope_scaling ({"rope_type": "llama3", "factor": 8, ...})
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    @property
    def num_params(self) -> int:
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * self.hidden_size) + embed + self.hidden_size

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    @classmethod
    def from_hf(cls, hf_config: Any, name: str = "model") -> "ModelConfig":
        """Map a transformers config (Llama/Mistral/Qwen2 families) onto ours."""
        c = hf_config
        num_heads = c.num_attention_heads
        # transformers 5 folds theta and scaling into `rope_parameters`; 4.x has both apart.
        rope_params = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
        rope_scaling = rope_params if rope_type not in ("default", None) else None
        theta = rope_params.get("rope_theta", getattr(c, "rope_theta", 10000.0))
        eos = c.eos_token_id if c.eos_token_id is not None else []
        eos = (eos,) if isinstance(eos, int) else tuple(eos)
        model_type = getattr(c, "model_type", "llama")
        return cls(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers, num_heads=num_heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // num_heads,
            rms_norm_eps=c.rms_norm_eps, rope_theta=float(theta),
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
            max_position_embeddings=c.max_position_embeddings,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(c, "attention_bias", model_type == "qwen2")),
            eos_token_ids=eos, name=name,
        )


@dataclass(frozen=True)
class EngineConfig:
    """Limits of one engine instance. Derived sizes are properties."""

    block_size: int = 16
    num_blocks: int | None = None  # None: derive from gpu_memory_fraction (GPU) or cpu_kv_bytes
    gpu_memory_fraction: float = 0.85
    cpu_kv_bytes: int = 512 << 20
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    attention_backend: str = "auto"  # registry key in engine.attention
    use_cuda_graphs: bool = True
    capture_graphs_at_start: bool = True  # False: capture each decode bucket on first use
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size={self.block_size}: use a power of two such as 16 or 32")
        if self.max_num_seqs <= 0:
            raise ConfigError(f"max_num_seqs={self.max_num_seqs}: must be >= 1")
        if self.max_num_batched_tokens <= 0:
            raise ConfigError(f"max_num_batched_tokens={self.max_num_batched_tokens}: must be >= 1")
        if not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise ConfigError(f"gpu_memory_fraction={self.gpu_memory_fraction}: must be in (0, 1]")
