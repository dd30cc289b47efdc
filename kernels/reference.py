"""Pure-torch references for every kernel in this package.

Each function has the same signature and semantics as the Triton op of the same name, so the
CPU engine path calls these directly and the tests compare the kernels against them. They favour
clarity over speed, but avoid per-token Python loops: the CPU engine runs on them.

Shared layouts (see engine/kv_cache.py):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables:     int32 [num_seqs, max_blocks_per_seq]; entries past a sequence's context
                      are arbitrary and never used to index
    context_lens:     int32 [num_seqs], tokens in the cache including those written this step
    slot_mapping:     int64 [num_tokens], block_id * block_size + offset; -1 means skip
GQA: query head i reads kv head i // (num_q_heads // num_kv_heads).
Softmax runs in float32; outputs take the query's dtype.
"""

from __future__ import annotations

import torch

__all__ = [
    "store_kv",
    "gather_kv_blocks",
    "scatter_kv_blocks",
    "paged_decode_attention",
    "prefill_attention",
    "gather_seq_kv",
    "fused_add_rms_norm",
    "silu_and_mul",
]


def store_kv(
    k: torch.Tensor,             # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,             # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,       # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # int64 [num_tokens], -1 = skip
) -> None:
    """Write each token's K and V into its cache slot, in place; slots of -1 are skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_flat = k_cache.view(-1, *k_cache.shape[2:])  # [num_blocks * block_size, num_kv_heads, head_dim]
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    k_flat[slots] = k[keep].to(k_cache.dtype)
    v_flat[slots] = v[keep].to(v_cache.dtype)


def token_slots(block_ids: torch.Tensor, block_size: int, num_tokens: int) -> torch.Tensor:
    """Flat slots of tokens 0..num_tokens-1 of a sequence whose pages are `block_ids`."""
    pos = torch.arange(num_tokens, device=block_ids.device)
    return block_ids.long()[pos // block_size] * block_size + pos % block_size


def gather_kv_blocks(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_ids: torch.Tensor,     # int32/int64 [n], the pages of one sequence in order
    num_tokens: int,             # <= n * block_size
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy the first `num_tokens` tokens held in pages `block_ids` out into contiguous
    `[num_tokens, num_kv_heads, head_dim]` tensors (K, V)."""
    block_size = k_cache.shape[1]
    slots = token_slots(block_ids, block_size, num_tokens)
    k = k_cache.view(-1, *k_cache.shape[2:])[slots]
    v = v_cache.view(-1, *v_cache.shape[2:])[slots]
    return k.contiguous(), v.contiguous()


def scatter_kv_blocks(
    k: torch.Tensor,             # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_ids: torch.Tensor,     # int32/int64 [n >= ceil(num_tokens / block_size)]
) -> None:
    """Inverse of gather_kv_blocks: token t goes to page block_ids[t // block_size], offset
    t % block_size. Slots past num_tokens in the last page are left untouched."""
    block_size = k_cache.shape[1]
    slots = token_slots(block_ids, block_size, k.shape[0])
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v.to(v_cache.dtype)


def gather_seq_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks_per_seq]
    context_lens: torch.Tensor,  # int32 [num_seqs]
    max_context_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense, padded copy of every sequence's K/V: ([num_seqs, max_context_len, num_kv_heads,
    head_dim] x2, valid mask [num_seqs, max_context_len]). Padding block-table entries are
    replaced by block 0 before indexing, so they are never dereferenced as given."""
    block_size = k_cache.shape[1]
    device = k_cache.device
    pos = torch.arange(max_context_len, device=device)                 # [max_context_len]
    valid = pos[None, :] < context_lens.to(device).long()[:, None]     # [num_seqs, max_context_len]
    page_idx = (pos // block_size).clamp(max=block_tables.shape[1] - 1)
    pages = block_tables.to(device).long()[:, page_idx]                # [num_seqs, max_context_len]
    pages = torch.where(valid, pages, torch.zeros_like(pages))
    slots = pages * block_size + pos % block_size
    k = k_cache.view(-1, *k_cache.shape[2:])[slots]
    v = v_cache.view(-1, *v_cache.shape[2:])[slots]
    return k, v, valid


def paged_decode_attention(
    q: torch.Tensor,             # [num_seqs, num_q_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence attending to all `context_lens[i]` cached tokens.
    Returns [num_seqs, num_q_heads, head_dim] in q's dtype; a sequence with context 0 gets 0."""
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    max_len = int(context_lens.max().item()) if num_seqs else 0
    if num_seqs == 0 or max_len == 0:
        return torch.zeros_like(q)
    k, v, valid = gather_seq_kv(k_cache, v_cache, block_tables, context_lens, max_len)
    qf = q.float().view(num_seqs, num_kv_heads, group, head_dim)
    # scores: [num_seqs, num_kv_heads, group, max_len]
    scores = torch.einsum("shgd,sthd->shgt", qf, k.float()) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows (context 0) -> 0
    out = torch.einsum("shgt,sthd->shgd", probs, v.float())
    return out.reshape(num_seqs, num_q_heads, head_dim).to(q.dtype)


def prefill_attention(
    q: torch.Tensor,                 # [total_q_tokens, num_q_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,   # int32 [num_seqs + 1]
    context_lens: torch.Tensor,      # int32 [num_seqs]
    scale: float,
    max_q_len: int | None = None,    # a host-side bound, only saves a device sync in the kernel
) -> torch.Tensor:
    """Causal attention for packed variable-length queries over the paged cache.

    Sequence i's queries are rows query_start_loc[i]:query_start_loc[i+1] of q and are its LAST
    q_len tokens out of context_lens[i] already stored in the cache, so query j sits at absolute
    position context_lens[i] - q_len + j and sees keys 0..that position.
    """
    del max_q_len
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = context_lens.tolist()
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    block_size = k_cache.shape[1]
    for i, ctx in enumerate(lens):
        q_len = starts[i + 1] - starts[i]
        if q_len == 0:
            continue
        k, v = gather_kv_blocks(k_cache, v_cache, block_tables[i, : -(-ctx // block_size)], ctx)
        qi = q[starts[i] : starts[i + 1]].float().view(q_len, num_kv_heads, group, head_dim)
        scores = torch.einsum("qhgd,khd->hgqk", qi, k.float()) * scale  # [kv, group, q_len, ctx]
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
        k_pos = torch.arange(ctx, device=q.device)
        scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = torch.einsum("hgqk,khd->qhgd", probs, v.float())
        out[starts[i] : starts[i + 1]] = o.reshape(q_len, num_q_heads, head_dim).to(q.dtype)
    return out


def fused_add_rms_norm(
    x: torch.Tensor,             # [num_tokens, hidden]
    residual: torch.Tensor | None,
    weight: torch.Tensor,        # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual' = x + residual (or x when residual is None); returns
    (rms_norm(residual') * weight, residual'), both in x's dtype; math in float32."""
    h = x.float() if residual is None else x.float() + residual.float()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return normed.to(x.dtype), h.to(x.dtype)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation: gate_up [..., 2 * d] -> silu(gate) * up, [..., d]."""
    d = gate_up.shape[-1] // 2
    gate, up = gate_up[..., :d], gate_up[..., d:]
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate_up.dtype)
