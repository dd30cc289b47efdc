"""Attention metadata for one step, and the registry of attention backends.

A step's tokens are packed prefill-first: rows [0, num_prefill_tokens) belong to prefill
(or prefill-chunk) sequences, the rest are one decode token per sequence. A backend is three
functions with the signatures of `kernels.reference`; "torch" runs anywhere, "triton" needs CUDA.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from engine.errors import ConfigError


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor            # int64 [num_tokens]
    num_prefill_tokens: int
    prefill_block_tables: torch.Tensor    # int32 [num_prefills, max_blocks]
    prefill_query_start_loc: torch.Tensor  # int32 [num_prefills + 1]
    prefill_context_lens: torch.Tensor    # int32 [num_prefills]
    max_prefill_q_len: int
    decode_block_tables: torch.Tensor     # int32 [num_decodes, max_blocks]
    decode_context_lens: torch.Tensor     # int32 [num_decodes]

    @property
    def num_prefills(self) -> int:
        return self.prefill_context_lens.shape[0]

    @property
    def num_decodes(self) -> int:
        return self.decode_context_lens.shape[0]


@dataclass(frozen=True)
class AttentionOps:
    store_kv: Callable[..., None]
    prefill_attention: Callable[..., torch.Tensor]
    paged_decode_attention: Callable[..., torch.Tensor]


def _torch_ops() -> AttentionOps:
    from kernels import reference as r
    return AttentionOps(r.store_kv, r.prefill_attention, r.paged_decode_attention)


def _triton_ops() -> AttentionOps:
    store = importlib.import_module("kernels.kv_store").store_kv
    prefill = importlib.import_module("kernels.prefill_attention").prefill_attention
    decode = importlib.import_module("kernels.paged_decode_attention").paged_decode_attention
    return AttentionOps(store, prefill, decode)


BACKENDS: dict[str, Callable[[], AttentionOps]] = {"torch": _torch_ops, "triton": _triton_ops}


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend key for `name` on `device`: "auto" is triton on CUDA, torch elsewhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name not in ("torch", "triton"):
        raise ConfigError(f"attention_backend={name!r}: choose one of ['torch', 'triton'] or 'auto'")
    if name == "triton" and device.type != "cuda":
        raise ConfigError("attention_backend='triton' needs device: cuda; use 'torch' on CPU")
    return name


def get_attention_ops(name: str, device: torch.device) -> AttentionOps:
    return BACKENDS[resolve_backend(name, device)]()


def attend(ops: AttentionOps, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [num_tokens, num_heads, head_dim] -> out, same shape. KV is already in the cache."""
    n = meta.num_prefill_tokens
    if meta.num_decodes == 0:
        return ops.prefill_attention(q, k_cache, v_cache, meta.prefill_block_tables,
                                     meta.prefill_query_start_loc, meta.prefill_context_lens, scale,
                                     meta.max_prefill_q_len)
    if n == 0:
        return ops.paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables,
                                          meta.decode_context_lens, scale)
    out = torch.empty_like(q)
    out[:n] = ops.prefill_attention(q[:n], k_cache, v_cache, meta.prefill_block_tables,
                                    meta.prefill_query_start_loc, meta.prefill_context_lens, scale,
                                    meta.max_prefill_q_len)
    out[n:] = ops.paged_decode_attention(q[n:], k_cache, v_cache, meta.decode_block_tables,
                                         meta.decode_context_lens, scale)
    return out
