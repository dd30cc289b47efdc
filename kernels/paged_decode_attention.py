"""Paged decode attention: one new query token per sequence over its paged KV cache.

Datasheet
---------
    out = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)

    q             [num_seqs, num_q_heads, head_dim]              bf16 / fp16 / fp32, last dim stride 1
    k_cache       [num_blocks, block_size, num_kv_heads, head_dim] same dtype as q, contiguous
    v_cache       same as k_cache
    block_tables  int32 [num_seqs, max_blocks_per_seq], last dim stride 1
    context_lens  int32 [num_seqs], 0 <= len <= max_blocks_per_seq * block_size
    out           [num_seqs, num_q_heads, head_dim], q's dtype, contiguous; 0 where context is 0

Limits: num_q_heads % num_kv_heads == 0 (GQA / MQA / MHA); head_dim <= 256 (any value; non
powers of two are masked); any block_size that is a power of two (16 and 32 in practice).
Context length is bounded only by the block table (32K+ tested in the benchmark).

Method (flash-decoding): the grid is (num_seqs, num_kv_heads, num_partitions). A program owns
one kv head of one sequence and one PARTITION of its context, and computes all
`num_q_heads / num_kv_heads` query heads of that group at once, so each K/V tile is read from
memory once. The query group is padded to 16 rows so the two products run as tensor-core dots.
Partial results (unnormalised output, running max and sum per head) go to float32 scratch and
a second, small kernel merges the partitions. When one partition covers the whole table the
first kernel normalises and writes `out` directly and the second is not launched.
The partition count comes from the block table's width, not from context_lens, so the wrapper
never syncs with the device and is safe to capture in a CUDA graph; partitions past a
sequence's context exit at once.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["paged_decode_attention"]

_LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["stride_bt_seq"])   # varies per batch: no recompiles while serving
def _paged_decode_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
    qk_scale,                                   # scale * log2(e): softmax runs in base 2
    stride_q_seq, stride_q_head,
    stride_cache_block, stride_cache_tok, stride_cache_head,
    stride_bt_seq,
    stride_o_seq, stride_o_head,
    stride_po_seq, stride_po_head, stride_po_part,   # part_out [seqs, q_heads, parts, head_dim]
    stride_pm_seq, stride_pm_head,                   # part_max/sum [seqs, q_heads, parts]
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PARTITION_SIZE: tl.constexpr,
    SINGLE_PARTITION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)

    ctx = tl.load(context_lens_ptr + seq)
    start = part * PARTITION_SIZE
    if not SINGLE_PARTITION:
        if start >= ctx:
            return
    end = tl.minimum(start + PARTITION_SIZE, ctx)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    q_heads = kv_head * GROUP + offs_g

    # [GROUP_PAD, HEAD_DIM_PAD]; padded rows are zero and never stored
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_q_seq + q_heads[:, None] * stride_q_head + offs_d[None, :],
        mask=mask_g[:, None] & mask_d[None, :], other=0.0,
    )

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)

    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    head_off = kv_head * stride_cache_head
    for tile_start in range(start, end, BLOCK_N):
        tok = tile_start + offs_n                                   # [BLOCK_N]
        mask_n = tok < end
        page = tl.load(bt_row + tok // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        row = page * stride_cache_block + (tok % BLOCK_SIZE) * stride_cache_tok + head_off
        kv_off = row[:, None] + offs_d[None, :]                     # [BLOCK_N, HEAD_DIM_PAD]
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)

        s = tl.dot(q, tl.trans(k)) * qk_scale                      # [GROUP_PAD, BLOCK_N]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if SINGLE_PARTITION:
        safe_l = tl.where(l_i > 0.0, l_i, 1.0)                      # context 0 -> output 0
        o = acc / safe_l[:, None]
        o_ptrs = out_ptr + seq.to(tl.int64) * stride_o_seq + q_heads[:, None] * stride_o_head + offs_d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])
    else:
        po = (part_out_ptr + seq.to(tl.int64) * stride_po_seq + q_heads[:, None] * stride_po_head
              + part * stride_po_part + offs_d[None, :])
        tl.store(po, acc, mask=mask_g[:, None] & mask_d[None, :])
        pm = seq.to(tl.int64) * stride_pm_seq + q_heads * stride_pm_head + part
        tl.store(part_max_ptr + pm, m_i, mask=mask_g)
        tl.store(part_sum_ptr + pm, l_i, mask=mask_g)


@triton.jit
def _paged_decode_reduce_kernel(
    out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr, context_lens_ptr,
    stride_o_seq, stride_o_head,
    stride_po_seq, stride_po_head, stride_po_part,
    stride_pm_seq, stride_pm_head,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    PARTITION_SIZE: tl.constexpr, PARTS_PER_ITER: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    ctx = tl.load(context_lens_ptr + seq)
    num_parts = tl.cdiv(ctx, PARTITION_SIZE)                      # only these were written

    offs_p = tl.arange(0, PARTS_PER_ITER)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_d = offs_d < HEAD_DIM
    pm_base = seq.to(tl.int64) * stride_pm_seq + head * stride_pm_head
    po_base = part_out_ptr + seq.to(tl.int64) * stride_po_seq + head * stride_po_head

    m_run = tl.full([1], float("-inf"), dtype=tl.float32)
    l_run = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM_PAD], dtype=tl.float32)
    for p0 in range(0, num_parts, PARTS_PER_ITER):
        parts = p0 + offs_p
        mask_p = parts < num_parts
        m_p = tl.load(part_max_ptr + pm_base + parts, mask=mask_p, other=float("-inf"))
        l_p = tl.load(part_sum_ptr + pm_base + parts, mask=mask_p, other=0.0)
        o_p = tl.load(po_base + parts[:, None] * stride_po_part + offs_d[None, :],
                      mask=mask_p[:, None] & mask_d[None, :], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m_p, 0))
        alpha = tl.exp2(m_run - m_new)                              # [1]
        w = tl.exp2(m_p - m_new)                                    # [PARTS_PER_ITER]; 0 where masked
        l_run = l_run * alpha + tl.sum(w * l_p, 0)
        acc = acc * alpha + tl.sum(w[:, None] * o_p, 0)
        m_run = m_new

    safe_l = tl.where(l_run > 0.0, l_run, 1.0)
    o = acc / safe_l
    tl.store(out_ptr + seq.to(tl.int64) * stride_o_seq + head * stride_o_head + offs_d,
             o.to(out_ptr.dtype.element_ty), mask=mask_d)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def choose_partition_size(num_seqs: int, num_kv_heads: int, max_context: int, block_n: int,
                          num_sms: int) -> int:
    """Smallest power-of-two partition (>= 4 tiles, <= 4096 tokens) that still gives ~4 programs
    per SM: long contexts at small batch get split, big batches up to 4K context are left whole
    (on an H200 one 4K partition beat two 2K ones by 13% at batch 64, and 512 was best for
    batch 1 at 32K). The 4096 cap bounds the straggler when one long sequence shares a batch."""
    target_programs = 4 * num_sms
    per_seq_head = max(1, target_programs // max(1, num_seqs * num_kv_heads))
    size = triton.next_power_of_2(max(1, -(-max_context // per_seq_head)))
    return int(min(max(size, 4 * block_n), 4096))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    partition_size: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> torch.Tensor:
    """See the module datasheet. The keyword-only arguments override the tuned launch choices
    (partition_size and block_n powers of two, partition_size a multiple of block_n)."""
    assert q.dim() == 3 and k_cache.dim() == 4, "q [seqs, q_heads, dim], cache [blocks, bs, kv_heads, dim]"
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(), "k/v cache differ"
    assert k_cache.is_contiguous(), "k_cache/v_cache must be contiguous pages"
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    assert cache_dim == head_dim, f"head_dim {head_dim} != cache head_dim {cache_dim}"
    assert head_dim <= 256, "head_dim > 256 not supported"
    assert num_q_heads % num_kv_heads == 0, "num_q_heads must be a multiple of num_kv_heads"
    assert q.dtype == k_cache.dtype == v_cache.dtype, "q and caches must share a dtype"
    assert q.stride(2) == 1, "q's last dim must be contiguous"
    assert block_size & (block_size - 1) == 0, "block_size must be a power of two"
    assert block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32, "int32 tables"
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs and block_tables.stride(1) == 1
    assert context_lens.shape == (num_seqs,) and context_lens.is_contiguous()
    assert q.device == k_cache.device == block_tables.device == context_lens.device

    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_seqs == 0:
        return out
    group = num_q_heads // num_kv_heads
    max_context = block_tables.shape[1] * block_size   # host-side bound: no device sync
    if block_n is None:
        block_n = 64 if head_dim <= 128 else 32
    block_n = max(block_n, 16)
    if partition_size is None:
        partition_size = choose_partition_size(num_seqs, num_kv_heads, max_context, block_n,
                                               _num_sms(q.device))
    assert partition_size % block_n == 0
    num_parts = max(1, -(-max_context // partition_size))
    single = num_parts == 1
    head_dim_pad = triton.next_power_of_2(head_dim)
    group_pad = max(16, triton.next_power_of_2(group))
    if num_warps is None:
        num_warps = 4 if block_n * head_dim_pad <= 64 * 128 else 8

    if single:
        part_out = part_max = part_sum = out       # unused
        po_strides, pm_strides = (0, 0, 0), (0, 0)
    else:
        part_out = torch.empty(num_seqs, num_q_heads, num_parts, head_dim, dtype=torch.float32,
                               device=q.device)
        part_max = torch.empty(num_seqs, num_q_heads, num_parts, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        po_strides = part_out.stride()[:3]
        pm_strides = part_max.stride()[:2]

    _paged_decode_attention_kernel[(num_seqs, num_kv_heads, num_parts)](
        q, k_cache, v_cache, block_tables, context_lens,
        out, part_out, part_max, part_sum,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        *po_strides, *pm_strides,
        GROUP=group, GROUP_PAD=group_pad,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, PARTITION_SIZE=partition_size,
        SINGLE_PARTITION=single,
        num_warps=num_warps, num_stages=num_stages,
    )
    if not single:
        _paged_decode_reduce_kernel[(num_seqs, num_q_heads)](
            out, part_out, part_max, part_sum, context_lens,
            out.stride(0), out.stride(1),
            *po_strides, *pm_strides,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
            PARTITION_SIZE=partition_size, PARTS_PER_ITER=16,
            num_warps=4,
        )
    return out
