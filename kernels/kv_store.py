"""store_kv: write this step's new K/V rows into their paged-cache slots.

Datasheet
---------
    store_kv(k, v, k_cache, v_cache, slot_mapping)     (in place, returns None)

    k, v          [num_tokens, num_kv_heads, head_dim]; any token/head strides, last dim stride 1
                  (so views split out of a fused qkv projection work without a copy)
    k_cache       [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache       same as k_cache
    slot_mapping  int64 (or int32) [num_tokens]; slot = block_id * block_size + offset; -1 = skip

dtype: k/v are cast to the cache dtype on store (bf16 / fp16 / fp32).
Grid: (cdiv(num_tokens, BLOCK_T), cdiv(num_kv_heads * head_dim, BLOCK)); each program copies a
[BLOCK_T tokens, BLOCK elements] tile of K and of V (about 4096 elements each, so a program moves
enough bytes to hide its start-up). Pure bandwidth: 2 x (read + write) of num_kv_heads * head_dim
elements per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["store_kv"]


@triton.jit(do_not_specialize=["num_tokens"])   # varies per step: no recompiles while serving
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, num_tokens,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    HEAD_DIM: tl.constexpr, ROW: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK: tl.constexpr,
):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)       # [BLOCK_T]
    in_range = toks < num_tokens
    slot = tl.load(slot_mapping_ptr + toks, mask=in_range, other=-1).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)           # flat (head, dim) index
    mask = (slot >= 0)[:, None] & (offs < ROW)[None, :]
    head = offs // HEAD_DIM
    dim = offs % HEAD_DIM
    toks64 = toks.to(tl.int64)[:, None]
    k = tl.load(k_ptr + toks64 * stride_k_tok + (head * stride_k_head + dim)[None, :], mask=mask)
    v = tl.load(v_ptr + toks64 * stride_v_tok + (head * stride_v_head + dim)[None, :], mask=mask)
    # a cache slot row is ROW contiguous elements
    dst = slot[:, None] * ROW + offs[None, :]
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    tokens_per_program: int | None = None,
) -> None:
    """See the module datasheet. `tokens_per_program` (a power of two) overrides the tile height."""
    assert k.dim() == 3 and k.shape == v.shape, "k, v must be [num_tokens, num_kv_heads, head_dim]"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "caches must match"
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous"
    num_tokens, num_kv_heads, head_dim = k.shape
    assert k_cache.shape[2:] == (num_kv_heads, head_dim), (
        f"k rows {tuple(k.shape[1:])} != cache rows {tuple(k_cache.shape[2:])}")
    assert k.stride(2) == 1 and v.stride(2) == 1, "k/v last dim must be contiguous"
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.is_contiguous()
    assert slot_mapping.dtype in (torch.int64, torch.int32), "slot_mapping must be int64/int32"
    assert k.device == k_cache.device == slot_mapping.device
    if num_tokens == 0:
        return
    row = num_kv_heads * head_dim
    block = min(triton.next_power_of_2(row), 4096)
    block_t = tokens_per_program or max(1, 4096 // block)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(row, block))
    _store_kv_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping, num_tokens,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        HEAD_DIM=head_dim, ROW=row, BLOCK_T=block_t, BLOCK=block,
        num_warps=4 if block_t * block <= 2048 else 8,
    )
