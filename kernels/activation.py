"""silu_and_mul: the SwiGLU activation of a fused gate/up projection, in one pass.

Datasheet
---------
    out = silu_and_mul(gate_up)

    gate_up  [..., 2 * d], bf16 / fp16 / fp32, last dim stride 1, leading dims collapsible to rows
    out      [..., d], gate_up's dtype: silu(gate_up[..., :d]) * gate_up[..., d:], math in float32

Grid: (rows, cdiv(d, BLOCK)). Bytes: read 2d, write d per row (the unfused torch version
reads and writes each intermediate again).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["silu_and_mul"]


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + offs, mask=mask, other=0.0).to(tl.float32)
    act = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + offs, act.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """See the module datasheet."""
    assert gate_up.shape[-1] % 2 == 0 and gate_up.stride(-1) == 1, "last dim must be 2*d, stride 1"
    d = gate_up.shape[-1] // 2
    x = gate_up.reshape(-1, 2 * d)   # a view when the leading dims are collapsible
    out = torch.empty(*gate_up.shape[:-1], d, dtype=gate_up.dtype, device=gate_up.device)
    rows = x.shape[0]
    if rows == 0 or d == 0:
        return out
    block = min(1024, triton.next_power_of_2(d))
    _silu_and_mul_kernel[(rows, triton.cdiv(d, block))](
        x, out, x.stride(0), d, d, BLOCK=block, num_warps=4,
    )
    return out
