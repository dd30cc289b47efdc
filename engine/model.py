"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) in plain single-device PyTorch.

Parallelism is applied from outside (see engine/tensor_parallel.py): a layer only knows its
local head counts, and calls `self.reduce` after its row-parallel projections (identity here).
Weights load from HF-named tensors; q/k/v and gate/up are stacked into one matmul each.
The elementwise ops (norm, SwiGLU, rotary) come from a `LayerOps` set chosen by device
(engine/fused_ops.py): torch references on CPU, Triton kernels on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from engine.attention import AttentionMetadata, AttentionOps, attend
from engine.config import ModelConfig
from engine.fused_ops import LayerOps, get_layer_ops
from engine.kv_cache import KVCache
from engine.rope import RotaryEmbedding


@dataclass
class ForwardContext:
    """Everything a step's layers share besides the hidden states."""

    meta: AttentionMetadata
    kv_cache: KVCache
    ops: AttentionOps
    # Called with the layer index once that layer's KV is in the cache (layer-wise streaming).
    on_layer_done: Callable[[int], None] | None = None


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, ops: LayerOps) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rope: RotaryEmbedding, ops: LayerOps) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.ops = ops
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, qkv_out, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.rope = rope
        self.reduce: Callable[[torch.Tensor], torch.Tensor] = _identity

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(hidden).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.ops.rotary(self.rope, positions, q, k)
        k_cache, v_cache = ctx.kv_cache.layer(self.layer_idx)
        ctx.ops.store_kv(k, v, k_cache, v_cache, ctx.meta.slot_mapping)
        out = attend(ctx.ops, q, k_cache, v_cache, ctx.meta, self.scale)
        return self.reduce(self.o_proj(out.reshape(num_tokens, q_size)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: LayerOps) -> None:
        super().__init__()
        self.ops = ops
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.reduce: Callable[[torch.Tensor], torch.Tensor] = _identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x))))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rope: RotaryEmbedding, ops: LayerOps) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, rope, ops)
        self.mlp = MLP(cfg, ops)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, ctx)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: LayerOps) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, rope, ops) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: LayerOps | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, ops or get_layer_ops("torch", torch.device("cpu")))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids, positions [num_tokens] -> final hidden states [num_tokens, hidden]."""
        hidden, residual = self.model.embed_tokens(input_ids), None
        for i, layer in enumerate(self.model.layers):
            hidden, residual = layer(positions, hidden, residual, ctx)
            if ctx.on_layer_done is not None:
                ctx.on_layer_done(i)
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    # ---- weights -------------------------------------------------------------------------

    _STACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    @torch.no_grad()
    def load_hf_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy HF-named tensors in, stacking q/k/v and gate/up. Every parameter must be set."""
        params = dict(self.named_parameters())
        pending: dict[str, list[torch.Tensor | None]] = {}
        loaded: set[str] = set()
        for name, tensor in tensors.items():
            if "rotary_emb" in name:
                continue
            parts = name.split(".")
            stacked = next((self._STACKED[p] for p in parts if p in self._STACKED), None)
            if stacked is None:
                if name not in params:
                    raise KeyError(f"checkpoint tensor {name!r} has no place in the model")
                params[name].copy_(tensor)
                loaded.add(name)
                continue
            target_mod, index = stacked
            target = ".".join(target_mod if p in self._STACKED else p for p in parts)
            pending.setdefault(target, [None, None, None] if target_mod == "qkv_proj" else [None, None])[index] = tensor
        for target, pieces in pending.items():
            if any(p is None for p in pieces):
                raise KeyError(f"checkpoint is missing part of {target}")
            params[target].copy_(torch.cat(pieces, dim=0))  # type: ignore[arg-type]
            loaded.add(target)
        if self.config.tie_word_embeddings:
            loaded.add("lm_head.weight")
        missing = set(params) - loaded
        if missing:
            raise KeyError(f"checkpoint lacks {sorted(missing)[:4]} ...")

    @torch.no_grad()
    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random values with a sane scale, for speed work on real shapes."""
        gen = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
