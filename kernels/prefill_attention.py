"""Prefill attention: causal attention of packed variable-length queries over the paged cache.

Datasheet
---------
    out = prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens,
                            scale, max_q_len=None)

    q                [total_q_tokens, num_q_heads, head_dim], bf16 / fp16 / fp32, last dim stride 1
    k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim], q's dtype, contiguous
    block_tables     int32 [num_seqs, max_blocks_per_seq], last dim stride 1
    query_start_loc  int32 [num_seqs + 1], prefix sums of the per-sequence query counts
    context_lens     int32 [num_seqs], tokens in the cache per sequence, this step's included
    max_q_len        optional host-side int >= every q_len; without it the wrapper reads
                     query_start_loc back from the device once (a sync)
    out              [total_q_tokens, num_q_heads, head_dim], q's dtype, contiguous

Sequence i's queries are its LAST q_len = query_start_loc[i+1] - query_start_loc[i] tokens out
of context_lens[i] (their K/V already stored by store_kv), so query j sits at absolute position
context_lens[i] - q_len + j and sees keys 0..that position. One op covers plain prefill
(q_len == context), chunked prefill after earlier chunks, and prefix-cache hits.

Limits: num_q_heads % num_kv_heads == 0; head_dim <= 256; block_size a power of two.

Method: FlashAttention-2 forward reading K/V straight from the pages (one block-table lookup per
key row). Grid (q tiles, num_seqs, num_q_heads); each program holds a BLOCK_M x head_dim query
tile and streams key tiles in two loops: the keys every row of the tile may see (no masking),
then the diagonal tiles with the causal mask. Sequences shorter than the longest exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["prefill_attention"]

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_row, head_off, start_n, kv_end, q_pos,
    qk_scale, stride_cache_block, stride_cache_tok, offs_n, offs_d, mask_d,
    BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
):
    tok = start_n + offs_n
    mask_n = tok < kv_end
    if MASKED:
        page = tl.load(bt_row + tok // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
    else:
        page = tl.load(bt_row + tok // BLOCK_SIZE).to(tl.int64)
    row = page * stride_cache_block + (tok % BLOCK_SIZE) * stride_cache_tok + head_off
    kv_off = row[:, None] + offs_d[None, :]
    if MASKED:
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
    elif EVEN_D:
        k = tl.load(k_cache_ptr + kv_off)
        v = tl.load(v_cache_ptr + kv_off)
    else:
        k = tl.load(k_cache_ptr + kv_off, mask=mask_d[None, :], other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=mask_d[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k)) * qk_scale                            # [BLOCK_M, BLOCK_N]
    if MASKED:
        s = tl.where((tok[None, :] <= q_pos[:, None]) & mask_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["stride_bt_seq"])   # varies per batch: no recompiles while serving
def _prefill_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr, context_lens_ptr,
    out_ptr,
    qk_scale,
    stride_q_tok, stride_q_head,
    stride_cache_block, stride_cache_tok, stride_cache_head,
    stride_bt_seq,
    stride_o_tok, stride_o_head,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # heaviest (last, most keys) query tiles are scheduled first: less tail under the causal mask
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    ctx = tl.load(context_lens_ptr + seq)
    prefix = ctx - q_len                                             # position of query 0

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_q_tok + head * stride_q_head + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    q_pos = prefix + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    head_off = (head // GROUP) * stride_cache_head
    # keys [0, full_end) are visible to every row of the tile; [full_end, kv_end) need the mask
    full_end = ((prefix + tile * BLOCK_M + 1) // BLOCK_N) * BLOCK_N
    kv_end = prefix + tl.minimum((tile + 1) * BLOCK_M, q_len)
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_row, head_off, start_n, kv_end, q_pos,
            qk_scale, stride_cache_block, stride_cache_tok, offs_n, offs_d, mask_d,
            BLOCK_SIZE=BLOCK_SIZE, MASKED=False, EVEN_D=HEAD_DIM == HEAD_DIM_PAD)
    for start_n in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_row, head_off, start_n, kv_end, q_pos,
            qk_scale, stride_cache_block, stride_cache_tok, offs_n, offs_d, mask_d,
            BLOCK_SIZE=BLOCK_SIZE, MASKED=True, EVEN_D=HEAD_DIM == HEAD_DIM_PAD)

    o = acc / l_i[:, None]
    o_ptrs = out_ptr + q_rows[:, None] * stride_o_tok + head * stride_o_head + offs_d[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_q_len: int | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 3,
) -> torch.Tensor:
    """See the module datasheet. The keyword-only arguments override the tuned launch choices."""
    assert q.dim() == 3 and k_cache.dim() == 4, "q [tokens, q_heads, dim], cache [blocks, bs, kv_heads, dim]"
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(), "k/v cache differ"
    assert k_cache.is_contiguous(), "k_cache/v_cache must be contiguous pages"
    total_q, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    assert cache_dim == head_dim and head_dim <= 256, f"head_dim {head_dim} vs cache {cache_dim}"
    assert num_q_heads % num_kv_heads == 0, "num_q_heads must be a multiple of num_kv_heads"
    assert q.dtype == k_cache.dtype == v_cache.dtype, "q and caches must share a dtype"
    assert q.stride(2) == 1, "q's last dim must be contiguous"
    assert block_size & (block_size - 1) == 0, "block_size must be a power of two"
    num_seqs = context_lens.shape[0]
    assert block_tables.dtype == torch.int32 and block_tables.dim() == 2 and block_tables.stride(1) == 1
    assert block_tables.shape[0] == num_seqs, "block_tables rows != num_seqs"
    assert query_start_loc.dtype == torch.int32 and query_start_loc.shape == (num_seqs + 1,)
    assert context_lens.dtype == torch.int32 and context_lens.is_contiguous()
    assert query_start_loc.is_contiguous()
    assert q.device == k_cache.device == block_tables.device == context_lens.device == query_start_loc.device

    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if total_q == 0 or num_seqs == 0:
        return out
    if max_q_len is None:
        max_q_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item())
    if max_q_len == 0:
        return out
    head_dim_pad = triton.next_power_of_2(head_dim)
    # H200 sweep (docs/kernels.md): 128x128 tiles, 8 warps for long queries; 64x64, 4 warps
    # once a query has under ~2K tokens (more programs, less causal waste per tile)
    long_q = max_q_len >= 2048 and head_dim_pad <= 128
    if block_m is None:
        block_m = 128 if long_q else 64
        block_m = min(block_m, max(16, triton.next_power_of_2(max_q_len)))
    if block_n is None:
        block_n = 128 if long_q else 64
    if num_warps is None:
        num_warps = 8 if block_m * head_dim_pad >= 128 * 128 else 4
    grid = (triton.cdiv(max_q_len, block_m), num_seqs, num_q_heads)
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, out,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=num_q_heads // num_kv_heads,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
