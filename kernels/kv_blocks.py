"""gather_kv_blocks / scatter_kv_blocks: move one sequence's pages to and from contiguous K/V.

The transfer layer sends a request's KV as contiguous tensors; these two ops pack its pages on
the sending side and unpack them into freshly allocated pages on the receiving side.

Datasheet
---------
    k, v = gather_kv_blocks(k_cache, v_cache, block_ids, num_tokens)
    scatter_kv_blocks(k, v, k_cache, v_cache, block_ids)              (in place)

    k_cache, v_cache  [num_blocks, block_size, num_kv_heads, head_dim], contiguous, any dtype
    block_ids         int32 / int64 [n], the sequence's pages in token order
    num_tokens        <= n * block_size; token t lives in page block_ids[t // block_size] at
                      offset t % block_size
    k, v              [num_tokens, num_kv_heads, head_dim], contiguous, the cache's dtype

scatter writes only the slots of tokens 0..num_tokens-1: the rest of a partial last page is left
as it was. Grid: (pages, cdiv(block_size * num_kv_heads * head_dim, BLOCK)); a page is one
contiguous run of block_size * num_kv_heads * head_dim elements, so both sides are streaming
copies. Pure bandwidth: read + write of 2 * num_tokens * num_kv_heads * head_dim elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gather_kv_blocks", "scatter_kv_blocks"]

_BLOCK = 4096


@triton.jit(do_not_specialize=["num_elems"])   # varies per request: no recompiles while serving
def _kv_blocks_copy_kernel(
    k_cache_ptr, v_cache_ptr, k_ptr, v_ptr, block_ids_ptr,
    num_elems,                   # num_tokens * TOKEN_ELEMS, a host int (i64 when it needs to be)
    TOKEN_ELEMS: tl.constexpr,   # num_kv_heads * head_dim
    PAGE_ELEMS: tl.constexpr,    # block_size * TOKEN_ELEMS
    BLOCK: tl.constexpr,
    TO_CACHE: tl.constexpr,      # False: gather pages -> k/v; True: scatter k/v -> pages
):
    page_idx = tl.program_id(0)
    chunk = tl.program_id(1)
    page = tl.load(block_ids_ptr + page_idx).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)                       # within the page
    first = page_idx.to(tl.int64) * PAGE_ELEMS                       # flat offset in k/v
    valid = num_elems - first                                        # elements left in k/v
    mask = (offs < PAGE_ELEMS) & (offs < valid)
    cache_off = page * PAGE_ELEMS + offs
    flat_off = first + offs
    if TO_CACHE:
        k = tl.load(k_ptr + flat_off, mask=mask)
        v = tl.load(v_ptr + flat_off, mask=mask)
        tl.store(k_cache_ptr + cache_off, k, mask=mask)
        tl.store(v_cache_ptr + cache_off, v, mask=mask)
    else:
        k = tl.load(k_cache_ptr + cache_off, mask=mask)
        v = tl.load(v_cache_ptr + cache_off, mask=mask)
        tl.store(k_ptr + flat_off, k, mask=mask)
        tl.store(v_ptr + flat_off, v, mask=mask)


def _check(k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor,
           num_tokens: int) -> None:
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous"
    assert block_ids.dim() == 1 and block_ids.is_contiguous(), "block_ids must be 1-D contiguous"
    assert block_ids.dtype in (torch.int32, torch.int64), "block_ids must be int32/int64"
    assert block_ids.device == k_cache.device
    assert 0 <= num_tokens <= block_ids.numel() * k_cache.shape[1], (
        f"num_tokens {num_tokens} > {block_ids.numel()} pages x {k_cache.shape[1]}")


def _launch(k_cache, v_cache, k, v, block_ids, num_tokens: int, to_cache: bool) -> None:
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    token_elems = num_kv_heads * head_dim
    page_elems = block_size * token_elems
    num_pages = triton.cdiv(num_tokens, block_size)
    grid = (num_pages, triton.cdiv(page_elems, _BLOCK))
    _kv_blocks_copy_kernel[grid](
        k_cache, v_cache, k, v, block_ids, num_tokens * token_elems,
        TOKEN_ELEMS=token_elems, PAGE_ELEMS=page_elems, BLOCK=_BLOCK, TO_CACHE=to_cache,
        num_warps=8,
    )


def gather_kv_blocks(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_ids: torch.Tensor,
    num_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module datasheet."""
    _check(k_cache, v_cache, block_ids, num_tokens)
    shape = (num_tokens, *k_cache.shape[2:])
    k = torch.empty(shape, dtype=k_cache.dtype, device=k_cache.device)
    v = torch.empty_like(k)
    if num_tokens:
        _launch(k_cache, v_cache, k, v, block_ids, num_tokens, to_cache=False)
    return k, v


def scatter_kv_blocks(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_ids: torch.Tensor,
) -> None:
    """See the module datasheet."""
    num_tokens = k.shape[0]
    _check(k_cache, v_cache, block_ids, num_tokens)
    assert k.shape == v.shape == (num_tokens, *k_cache.shape[2:]), "k/v must be [tokens, kv_heads, dim]"
    assert k.is_contiguous() and v.is_contiguous(), "k/v must be contiguous"
    assert k.dtype == v.dtype == k_cache.dtype, "k/v must have the cache's dtype"
    assert k.device == k_cache.device
    if num_tokens:
        _launch(k_cache, v_cache, k, v, block_ids, num_tokens, to_cache=True)
