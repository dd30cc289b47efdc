"""Symbol-level codec kernels: quantized symbols back to values (decode), and per-table symbol
counts (the rANS tables of symbols quantized elsewhere). Same values as the CPU reference
(kvtransfer/codec/quant.py); quantization itself is kernels/codec_quantize.py.

    dequantize(syms, step, gdiv, gmod, max_q, dtype) -> [S, n] (escapes come out 0)
        value = (sym - MAX_Q) * step[s, (i // gdiv) % gmod], clamped to the dtype's range
    histogram(syms, num_tables, tab_div, tab_mod, A) -> int32 [S * num_tables, A]
        tables (i // tab_div) % num_tables, num_tables * A <= 4096
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.codec_rans import _cast_rne

__all__ = ["dequantize", "histogram"]


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
    tl.store(out_ptr + s * n + i, _cast_rne(v, out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _histogram_kernel(sym_ptr, counts_ptr, n, num_tables, tab_div, tab_mod, A: tl.constexpr, NB: tl.constexpr,
                      BLOCK: tl.constexpr, ITERS: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    hist = tl.zeros([NB], tl.int32)
    num_pad = 0
    for it in range(ITERS):
        i = (tl.program_id(1).to(tl.int64) * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        sym = tl.load(sym_ptr + s * n + i, mask=m, other=0).to(tl.int32)
        key = tl.where(m, ((i // tab_div) % tab_mod).to(tl.int32) * A + sym, 0)
        hist += tl.histogram(key, NB)
        num_pad += BLOCK - tl.sum(m.to(tl.int32), 0)
    bins = tl.arange(0, NB)
    hist = hist - tl.where(bins == 0, num_pad, 0)
    tl.atomic_add(counts_ptr + s * num_tables * A + bins, hist, mask=(hist != 0) & (bins < num_tables * A))


BLOCK = 2048


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
    """Per-(segment, table) symbol counts; tables are (i // tab_div) % tab_mod (<= 16 x 256 bins)."""
    s_count, n = syms.shape
    if num_tables != tab_mod or num_tables * alphabet > 4096:
        raise ValueError("histogram takes tables (i // tab_div) % num_tables with num_tables * A <= 4096")
    counts = torch.zeros((s_count * num_tables, alphabet), dtype=torch.int32, device=syms.device)
    if n:
        iters = 8
        _histogram_kernel[(s_count, triton.cdiv(n, BLOCK * iters))](
            syms, counts, n, num_tables, tab_div, tab_mod, A=alphabet,
            NB=triton.next_power_of_2(num_tables * alphabet), BLOCK=BLOCK, ITERS=iters)
    return counts
