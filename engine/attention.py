"""Attention metadata for one step, and the registry of attention backends.

A step's tokens are packed prefill-first: rows [0, num_prefill_tokens) belong to prefill
(or prefill-chunk) sequences, the rest are one decode token per sequence. A backend is three
functions with the signatures of `kernels.reference`; "torch" runs anywhere, "triton" needs CUDA.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

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
    return AttentionOps(r.store_kv, r.prefill_attention, length_grouped(r.paged_decode_attention))


def length_grouped(decode: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The torch decode attention pads every sequence to the longest in the batch. With
    heavy-tailed contexts (ShareGPT on CPU: mean ~100 tokens, the longest of a batch of 16 often
    500) the padding was most of the step: served decode steps ran 1.5-1.7x their profile, which
    times uniform contexts. Sequences are sorted by context and cut into groups whose longest is
    at most twice their shortest (16 tokens at least), so padded work stays within 2x of the
    real work. Each row's result is the same (padding is masked out)."""
    # every layer of a step passes the same context_lens tensor (the runner builds one per step)
    last: list[Any] = [None, []]

    def groups_of(context_lens: torch.Tensor) -> list[torch.Tensor]:
        if last[0] is not context_lens:
            lens = context_lens.tolist()
            order = sorted(range(len(lens)), key=lens.__getitem__)
            groups, start = [], 0
            for i in range(1, len(lens) + 1):
                if i == len(lens) or lens[order[i]] > 2 * max(lens[order[start]], 16):
                    groups.append(torch.tensor(order[start:i]))
                    start = i
            last[:] = [context_lens, groups]
        return last[1]

    def run(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            context_lens: torch.Tensor, scale: float) -> torch.Tensor:
        if q.shape[0] <= 1 or not q.is_cpu:   # a host read on a GPU would sync the step
            return decode(q, k_cache, v_cache, block_tables, context_lens, scale)
        groups = groups_of(context_lens)
        if len(groups) == 1:
            return decode(q, k_cache, v_cache, block_tables, context_lens, scale)
        out = torch.empty_like(q)
        for idx in groups:
            out[idx] = decode(q[idx], k_cache, v_cache, block_tables[idx], context_lens[idx], scale)
        return out
    return run


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
