"""rotary_embedding_: rotate q and k in place (HF "rotate half" layout), one launch per layer.

Datasheet
---------
    rotary_embedding_(q, k, positions, cos, sin)        (in place, returns None)

    q          [num_tokens, num_q_heads, head_dim], bf16 / fp16 / fp32, last dim stride 1; any
               token/head strides (a view split out of the fused qkv projection works as is)
    k          [num_tokens, num_kv_heads, head_dim], q's dtype, same rules
    positions  int64 [num_tokens], contiguous
    cos, sin   [max_positions, head_dim // 2], any float dtype, contiguous (RotaryEmbedding's tables)

For each token t and head h: x1, x2 = x[:half], x[half:]; x <- (x1*cos - x2*sin, x2*cos + x1*sin)
with cos/sin taken at positions[t]. Math in float32, stored in q's dtype.

Grid (num_tokens,): a program rotates every q and k head of one token, so the cos/sin row is
read once. Replaces the ~18 elementwise launches of the eager torch version (gather, cast,
chunk, four products, two sums, concat for each of q and k); under a decode CUDA graph at
batch 1 those launches, not bytes, are the cost.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rotary_embedding_"]


@triton.jit
def _rotate_heads(x_ptr, stride_h, cos, sin, NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                  HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HALF_PAD)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HALF)[None, :]
    p1 = x_ptr + offs_h[:, None] * stride_h + offs_d[None, :]     # [HEADS_PAD, HALF_PAD]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    ty = x_ptr.dtype.element_ty
    tl.store(p1, (x1 * cos - x2 * sin).to(ty), mask=mask)
    tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(ty), mask=mask)


@triton.jit
def _rotary_embedding_kernel(
    q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_cs,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    offs_d = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_ptr + pos * stride_cs + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cs + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr + tok * stride_q_tok, stride_q_head, cos, sin,
                  NUM_Q_HEADS, Q_HEADS_PAD, HALF, HALF_PAD)
    _rotate_heads(k_ptr + tok * stride_k_tok, stride_k_head, cos, sin,
                  NUM_KV_HEADS, KV_HEADS_PAD, HALF, HALF_PAD)


def rotary_embedding_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor) -> None:
    """See the module datasheet."""
    assert q.dim() == 3 and k.dim() == 3 and q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2]
    assert q.stride(2) == 1 and k.stride(2) == 1, "q/k last dim must be contiguous"
    assert q.dtype == k.dtype and q.device == k.device == positions.device == cos.device
    num_tokens, num_q_heads, head_dim = q.shape
    half = head_dim // 2
    assert head_dim % 2 == 0 and cos.shape[1] == half and cos.shape == sin.shape
    assert cos.is_contiguous() and sin.is_contiguous() and positions.is_contiguous()
    if num_tokens == 0:
        return
    _rotary_embedding_kernel[(num_tokens,)](
        q, k, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=k.shape[1],
        Q_HEADS_PAD=triton.next_power_of_2(num_q_heads), KV_HEADS_PAD=triton.next_power_of_2(k.shape[1]),
        HALF=half, HALF_PAD=triton.next_power_of_2(half),
        num_warps=4,
    )
