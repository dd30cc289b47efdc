"""KV quantize / dequantize / symbol histogram on the GPU. Same results as the CPU reference
(kvtransfer/codec/quant.py): one fp32 multiply, then round half away from zero by compares
only (no arithmetic on the product, so no fused multiply-add can change a symbol).

Datasheet
---------
    quantize(x, inv, gdiv, gmod, max_q) -> uint8 symbols [S, n]
        x    [S, T, R] view (any segment/token strides, R = heads * head_dim contiguous), fp16/bf16/fp32
        inv  fp32 [S, G]: element i of a segment uses inv[s, (i // gdiv) % gmod]
        symbol = q + max_q for |q| <= max_q, else 2 * max_q + 1 (escape)
    dequantize(syms, step, gdiv, gmod, max_q, dtype, lim) -> [S, n] dtype (escapes come out 0)
    histogram(syms, num_tables, tab_div, tab_mod, A) -> int32 [S * num_tables, A]
Grid: (S, cdiv(n, BLOCK)); BLOCK = 2048 elements per program. Pure bandwidth apart from the
histogram's atomics (integer, so the counts do not depend on their order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["quantize", "dequantize", "histogram"]


@triton.jit
def _quantize_kernel(x_ptr, inv_ptr, out_ptr, n, row, stride_s, stride_t, num_g, gdiv, gmod,
                     MAX_Q: tl.constexpr, BLOCK: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    xv = tl.load(x_ptr + s * stride_s + (i // row) * stride_t + i % row, mask=m, other=0).to(tl.float32)
    inv = tl.load(inv_ptr + s * num_g + (i // gdiv) % gmod, mask=m, other=1.0)
    y = xv * inv
    y = tl.minimum(tl.maximum(y, -1048576.0), 1048576.0)
    t = y.to(tl.int32)                      # truncates toward zero
    tf = t.to(tl.float32)
    q = t + (y >= tf + 0.5).to(tl.int32) - (y <= tf - 0.5).to(tl.int32)
    esc = (q > MAX_Q) | (q < -MAX_Q)
    sym = tl.where(esc, 2 * MAX_Q + 1, q + MAX_Q)
    tl.store(out_ptr + s * n + i, sym.to(tl.uint8), mask=m)


@triton.jit
def _dequantize_kernel(sym_ptr, step_ptr, out_ptr, n, num_g, gdiv, gmod, lim,
                       MAX_Q: tl.constexpr, BLOCK: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    sym = tl.load(sym_ptr + s * n + i, mask=m, other=MAX_Q).to(tl.int32)
    step = tl.load(step_ptr + s * num_g + (i // gdiv) % gmod, mask=m, other=1.0)
    q = tl.where(sym == 2 * MAX_Q + 1, 0, sym - MAX_Q)
    v = q.to(tl.float32) * step
    v = tl.minimum(tl.maximum(v, -lim), lim)
    tl.store(out_ptr + s * n + i, v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _histogram_kernel(sym_ptr, counts_ptr, n, num_tables, tab_div, tab_mod, A: tl.constexpr, BLOCK: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    sym = tl.load(sym_ptr + s * n + i, mask=m, other=0).to(tl.int64)
    tab = s * num_tables + (i // tab_div) % tab_mod
    tl.atomic_add(counts_ptr + tab * A + sym, tl.full([BLOCK], 1, tl.int32), mask=m)


BLOCK = 2048


def quantize(x: torch.Tensor, inv: torch.Tensor, gdiv: int, gmod: int, max_q: int) -> torch.Tensor:
    if x.dim() != 3 or x.stride(2) != 1:
        raise ValueError("x must be [S, T, R] with contiguous rows")
    if inv.dtype != torch.float32 or inv.dim() != 2 or inv.shape[0] != x.shape[0] or not inv.is_contiguous():
        raise ValueError("inv must be contiguous fp32 [S, G]")
    s_count, t, row = x.shape
    n = t * row
    out = torch.empty((s_count, n), dtype=torch.uint8, device=x.device)
    if n:
        _quantize_kernel[(s_count, triton.cdiv(n, BLOCK))](x, inv, out, n, row, x.stride(0), x.stride(1),
                                                           inv.shape[1], gdiv, gmod, MAX_Q=max_q, BLOCK=BLOCK)
    return out


def dequantize(syms: torch.Tensor, step: torch.Tensor, gdiv: int, gmod: int, max_q: int,
               dtype: torch.dtype) -> torch.Tensor:
    s_count, n = syms.shape
    out = torch.empty((s_count, n), dtype=dtype, device=syms.device)
    if n:
        _dequantize_kernel[(s_count, triton.cdiv(n, BLOCK))](syms, step.contiguous(), out, n, step.shape[1], gdiv,
                                                             gmod, float(torch.finfo(dtype).max), MAX_Q=max_q,
                                                             BLOCK=BLOCK)
    return out


def histogram(syms: torch.Tensor, num_tables: int, tab_div: int, tab_mod: int, alphabet: int) -> torch.Tensor:
    s_count, n = syms.shape
    counts = torch.zeros((s_count * num_tables, alphabet), dtype=torch.int32, device=syms.device)
    if n:
        _histogram_kernel[(s_count, triton.cdiv(n, BLOCK))](syms, counts, n, num_tables, tab_div, tab_mod,
                                                            A=alphabet, BLOCK=BLOCK)
    return counts
