"""fused_add_rms_norm: residual add + RMSNorm in one pass over the hidden states.

Datasheet
---------
    normed, residual_out = fused_add_rms_norm(x, residual, weight, eps)

    x            [num_tokens, hidden], bf16 / fp16 / fp32, rows contiguous (last dim stride 1)
    residual     same shape and dtype as x, or None (first layer: residual_out = x)
    weight       [hidden], contiguous, any float dtype
    normed       [num_tokens, hidden], x's dtype: rms_norm(x + residual) * weight
    residual_out [num_tokens, hidden], x's dtype: x + residual (new tensors; inputs untouched)

Math in float32; one program per token row, the whole row in registers (hidden <= 16384).
Bytes: read x, residual, weight; write two rows: ~4 x num_tokens x hidden elements, vs ~8 for
the unfused add, cast, pow, mean, rsqrt, mul sequence.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["fused_add_rms_norm"]


@triton.jit
def _fused_add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_o, stride_ro,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    h = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
    # the residual stream is kept in x's dtype, as the unfused model does
    h_store = h.to(res_out_ptr.dtype.element_ty)
    tl.store(res_out_ptr + row * stride_ro + offs, h_store, mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / hidden + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (h * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module datasheet."""
    assert x.dim() == 2 and x.stride(1) == 1, "x must be [num_tokens, hidden] with contiguous rows"
    num_tokens, hidden = x.shape
    assert weight.shape == (hidden,) and weight.is_contiguous(), "weight must be [hidden]"
    assert hidden <= 16384, "hidden > 16384 not supported"
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    res_out = torch.empty_like(out)
    if num_tokens == 0:
        return out, res_out
    block = triton.next_power_of_2(hidden)
    res = residual if residual is not None else x
    _fused_add_rms_norm_kernel[(num_tokens,)](
        x, res, weight, out, res_out,
        x.stride(0), res.stride(0), out.stride(0), res_out.stride(0),
        hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )
    return out, res_out
