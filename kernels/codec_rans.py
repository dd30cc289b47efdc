"""Interleaved rANS on the GPU: encode, compaction, decode. Same bytes as the CPU reference
(kvtransfer/codec/rans.py, which documents the stream model).

Datasheet
---------
    rans_encode(syms, freq, cum, n, num_tables, tab_div, tab_mod, lane_len)
        -> (words int16 [total], group_counts int64 [S * G], states int64 [S * G * 32])
    rans_decode(words, group_counts, states, freq, cum, n, num_tables, tab_div, tab_mod, lane_len)
        -> (syms uint8 [S, n], final states, final word pointers) for the caller's integrity check

    syms   uint8 [S, n] (S segments of n symbols, contiguous); symbol i of segment s uses table
           s * num_tables + (i // tab_div) % tab_mod, a row of freq/cum (int32 [S*num_tables, A])
    lanes  num_groups = cdiv(n, 32 * lane_len) groups of 32 lanes per segment; symbol i goes to lane
           i % (32 * num_groups) at step i // (32 * num_groups)
Grid: one program per GPP groups (GPP * 32 lanes, a [GPP, 32] tile); each program walks all steps.
Per step: one symbol load, two table loads, a 32-wide prefix sum per group for word positions.
The encoder writes each group's words backwards into a [rows, steps * 32] scratch buffer; the
compaction kernel then packs the groups' tails into one contiguous stream.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rans_encode", "rans_decode", "plan_lanes"]

PROB_BITS = 14
GROUP = 32


def plan_lanes(n: int, lane_len: int) -> tuple[int, int, int]:
    num_groups = max(1, -(-n // (GROUP * lane_len)))
    num_lanes = num_groups * GROUP
    return num_groups, num_lanes, max(1, -(-n // num_lanes))


@triton.jit
def _rans_encode_kernel(sym_ptr, freq_ptr, cum_ptr, buf_ptr, end_ptr, state_ptr,
                        n, num_groups, num_rows, steps, cap, num_tables, tab_div, tab_mod,
                        A: tl.constexpr, GPP: tl.constexpr):
    rows = tl.program_id(0) * GPP + tl.arange(0, GPP)
    row_ok = rows < num_rows
    seg = (rows // num_groups).to(tl.int64)
    lg = (((rows % num_groups) * 32)[:, None] + tl.arange(0, 32)[None, :]).to(tl.int64)
    num_lanes = num_groups * 32
    x = tl.full([GPP, 32], 65536, tl.int64)
    e = tl.zeros([GPP], tl.int64) + cap
    for tt in range(steps):
        t = steps - 1 - tt
        i = lg + t * num_lanes
        active = (i < n) & row_ok[:, None]
        s = tl.load(sym_ptr + seg[:, None] * n + i, mask=active, other=0).to(tl.int64)
        tab = seg[:, None] * num_tables + (i // tab_div) % tab_mod
        f = tl.load(freq_ptr + tab * A + s, mask=active, other=1).to(tl.int64)
        c = tl.load(cum_ptr + tab * A + s, mask=active, other=0).to(tl.int64)
        need = active & (x >= (f << 18))
        ni = need.to(tl.int32)
        rank = tl.cumsum(ni, axis=1) - ni
        k = tl.sum(ni, axis=1).to(tl.int64)
        pos = e[:, None] - k[:, None] + rank
        tl.store(buf_ptr + rows.to(tl.int64)[:, None] * cap + pos, (x & 0xFFFF).to(tl.int16), mask=need)
        e = e - k
        x = tl.where(need, x >> 16, x)
        q = x // f
        x = tl.where(active, (q << 14) + (x - q * f) + c, x)
    tl.store(end_ptr + rows, e, mask=row_ok)
    tl.store(state_ptr + rows.to(tl.int64)[:, None] * 32 + tl.arange(0, 32)[None, :], x, mask=row_ok[:, None])


@triton.jit
def _compact_kernel(buf_ptr, end_ptr, off_ptr, out_ptr, cap, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    e = tl.load(end_ptr + row)
    off = tl.load(off_ptr + row)
    for st in range(0, cap - e, BLOCK):
        j = st + tl.arange(0, BLOCK)
        m = j < cap - e
        w = tl.load(buf_ptr + row * cap + e + j, mask=m)
        tl.store(out_ptr + off + j, w, mask=m)


@triton.jit
def _rans_decode_kernel(words_ptr, start_ptr, state_ptr, freq_ptr, cum_ptr, lut_ptr, out_ptr,
                        fin_state_ptr, fin_ptr_ptr, total_words,
                        n, num_groups, num_rows, steps, num_tables, tab_div, tab_mod,
                        A: tl.constexpr, GPP: tl.constexpr):
    rows = tl.program_id(0) * GPP + tl.arange(0, GPP)
    row_ok = rows < num_rows
    seg = (rows // num_groups).to(tl.int64)
    lg = (((rows % num_groups) * 32)[:, None] + tl.arange(0, 32)[None, :]).to(tl.int64)
    num_lanes = num_groups * 32
    x = tl.load(state_ptr + rows.to(tl.int64)[:, None] * 32 + tl.arange(0, 32)[None, :],
                mask=row_ok[:, None], other=65536).to(tl.int64)
    p = tl.load(start_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    for t in range(steps):
        i = lg + t * num_lanes
        active = (i < n) & row_ok[:, None]
        tab = seg[:, None] * num_tables + (i // tab_div) % tab_mod
        slot = x & 16383
        s = tl.load(lut_ptr + tab * 16384 + slot, mask=active, other=0).to(tl.int64)
        f = tl.load(freq_ptr + tab * A + s, mask=active, other=1).to(tl.int64)
        c = tl.load(cum_ptr + tab * A + s, mask=active, other=0).to(tl.int64)
        x = tl.where(active, f * (x >> 14) + slot - c, x)
        tl.store(out_ptr + seg[:, None] * n + i, s.to(tl.uint8), mask=active)
        need = active & (x < 65536)
        ni = need.to(tl.int32)
        rank = tl.cumsum(ni, axis=1) - ni
        at = tl.minimum(p[:, None] + rank, total_words - 1)
        w = tl.load(words_ptr + at, mask=need, other=0).to(tl.int64) & 0xFFFF
        x = tl.where(need, (x << 16) | w, x)
        p = p + tl.sum(ni, axis=1).to(tl.int64)
    tl.store(fin_state_ptr + rows.to(tl.int64)[:, None] * 32 + tl.arange(0, 32)[None, :], x, mask=row_ok[:, None])
    tl.store(fin_ptr_ptr + rows, p, mask=row_ok)


def _check_tables(freq: torch.Tensor, cum: torch.Tensor, syms_device: torch.device) -> None:
    if freq.dtype != torch.int32 or cum.dtype != torch.int32 or freq.shape != cum.shape or freq.dim() != 2:
        raise ValueError("freq/cum must be int32 [num_tables, A] of one shape")
    if freq.device != syms_device:
        raise ValueError("tables and symbols must be on one device")


def rans_encode(syms: torch.Tensor, freq: torch.Tensor, cum: torch.Tensor, num_tables: int, tab_div: int,
                tab_mod: int, lane_len: int, gpp: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if syms.dtype != torch.uint8 or syms.dim() != 2 or not syms.is_contiguous():
        raise ValueError("syms must be contiguous uint8 [S, n]")
    _check_tables(freq, cum, syms.device)
    s_count, n = syms.shape
    num_groups, _, steps = plan_lanes(n, lane_len)
    rows = s_count * num_groups
    cap = steps * GROUP
    buf = torch.empty(rows * cap, dtype=torch.int16, device=syms.device)
    end = torch.empty(rows, dtype=torch.int64, device=syms.device)
    states = torch.empty(rows * GROUP, dtype=torch.int64, device=syms.device)
    _rans_encode_kernel[(triton.cdiv(rows, gpp),)](
        syms, freq, cum, buf, end, states, n, num_groups, rows, steps, cap, num_tables, tab_div, tab_mod,
        A=freq.shape[1], GPP=gpp)
    counts = cap - end
    off = torch.cumsum(counts, 0) - counts
    total = int(counts.sum())
    words = torch.empty(max(total, 1), dtype=torch.int16, device=syms.device)
    _compact_kernel[(rows,)](buf, end, off, words, cap, BLOCK=1024)
    return words[:total], counts, states


def slot_lut(freq: torch.Tensor) -> torch.Tensor:
    """[num_tables, A] frequencies -> [num_tables, 2^14] uint8 symbol of each slot."""
    nt, a = freq.shape
    sym = torch.arange(a, device=freq.device).repeat(nt)
    return torch.repeat_interleave(sym, freq.reshape(-1).long()).to(torch.uint8).reshape(nt, 1 << PROB_BITS)


def rans_decode(words: torch.Tensor, counts: torch.Tensor, states: torch.Tensor, freq: torch.Tensor,
                cum: torch.Tensor, s_count: int, n: int, num_tables: int, tab_div: int, tab_mod: int,
                lane_len: int, gpp: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (syms [S, n] uint8, final states, final word pointers, group word ends)."""
    _check_tables(freq, cum, words.device)
    num_groups, _, steps = plan_lanes(n, lane_len)
    rows = s_count * num_groups
    if counts.numel() != rows or states.numel() != rows * GROUP:
        raise ValueError(f"expected {rows} group counts and {rows * GROUP} states")
    counts = counts.to(torch.int64)
    start = torch.cumsum(counts, 0) - counts
    out = torch.empty((s_count, n), dtype=torch.uint8, device=words.device)
    fin_x = torch.empty(rows * GROUP, dtype=torch.int64, device=words.device)
    fin_p = torch.empty(rows, dtype=torch.int64, device=words.device)
    w = words if words.numel() else torch.zeros(1, dtype=torch.int16, device=words.device)
    _rans_decode_kernel[(triton.cdiv(rows, gpp),)](
        w, start, states.to(torch.int64), freq, cum, slot_lut(freq), out, fin_x, fin_p, w.numel(),
        n, num_groups, rows, steps, num_tables, tab_div, tab_mod, A=freq.shape[1], GPP=gpp)
    return out, fin_x, fin_p, start + counts
