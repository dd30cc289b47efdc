"""Interleaved rANS on the GPU: tables, encode, compaction, decode (+ fused dequantize). Same
bytes as the CPU reference (kvtransfer/codec/rans.py, which documents the stream model), all
segments of a request per launch, 32-bit state arithmetic, no host syncs.

Datasheet
---------
    build_tables(counts_or_freq, from_counts, want_lut) -> Tables
        one program per table row [R, A] int32: frequencies normalized exactly like
        rans.normalize_counts (or taken as given), then per symbol
          enc   int32 (f - 1) | cum << 14 | ceil(log2 f) << 28     (encoder entry)
          magic uint32 bits, Granlund-Montgomery multiplier: x // f = (t + ((x - t) >> min(l, 1)))
                >> max(l - 1, 0) with t = umulhi(x, magic), exact for every 32-bit x
          dec   int32 (f - 1) | cum << 14                          (decoder entry)
          lut   uint8 [R, 2^14] symbol of each slot                (decoder only)
    rans_encode(syms, tables, num_tables, tab_div, tab_mod, lane_len)
        -> (words int16 [capacity], group word counts int32 [S * G], total int32 [1], states int32 [S * G * 32])
    rans_decode(words, counts, states, tables, s_count, n, ...) -> syms uint8 [S, n] or values [S, n], flags
        flags int32: [0] a lane did not end cleanly; with values, [1 + s] escapes in segment s,
        whose slots come out NaN (the caller scatters the exact values and checks it named them all)
    syms   uint8 [S, n] (S segments of n symbols); symbol i of segment s uses table
           s * num_tables + (i // tab_div) % tab_mod
    lanes  num_groups = cdiv(n, 32 * lane_len) groups of 32 lanes per segment; symbol i goes to lane
           i % (32 * num_groups) at step i // (32 * num_groups)
State: uint32 x in [2^16, 2^32); renormalize when x >> 18 >= f (one 16-bit word). The encoder
loads the symbol two steps ahead and its table entries one step ahead, so a step's dependent
chain is integer ALU work plus one 32-wide prefix sum; the decoder loads the 32 words a group can
consume at a step before it knows which lanes need them, then picks them with a gather.
Grid: one program per GPP groups ([GPP, 32] tile, one warp per group); each walks all steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["Tables", "build_tables", "rans_encode", "rans_decode", "plan_lanes"]

PROB_BITS = 14
GROUP = 32


def plan_lanes(n: int, lane_len: int) -> tuple[int, int, int]:
    num_groups = max(1, -(-n // (GROUP * lane_len)))
    num_lanes = num_groups * GROUP
    return num_groups, num_lanes, max(1, -(-n // num_lanes))


@triton.jit
def _bit_length(v):
    """Bit length of int32 v in [0, 2^24) (0 for 0), via an exact int -> float conversion."""
    e = (v.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 255
    return tl.where(v > 0, e - 126, 0)


@triton.jit
def _cast_rne(v, dtype: tl.constexpr):
    """fp32 -> dtype rounded to nearest even, as torch's cast in the CPU decoder (bf16 by bits:
    the same on the GPU and in the interpreter); v is finite."""
    if dtype == tl.bfloat16:
        b = v.to(tl.int32, bitcast=True)
        return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    elif dtype == tl.float32:
        return v
    else:
        return v.to(dtype)


@triton.jit
def _tables_kernel(in_ptr, freq_ptr, enc_ptr, mag_ptr, dec_ptr, lut_ptr, A: tl.constexpr, AP: tl.constexpr,
                   FROM_COUNTS: tl.constexpr, WANT_LUT: tl.constexpr, LUT_BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, AP)
    sm = s < A
    if FROM_COUNTS:
        counts = tl.load(in_ptr + r * A + s, mask=sm, other=0).to(tl.int64)
        total = tl.maximum(tl.sum(counts, 0), 1)
        freq = counts * (16384 - A) // total + (counts > 0).to(tl.int64)
        rem = 16384 - tl.sum(freq, 0)
        top = tl.argmax(tl.where(sm, counts, -1), 0, tie_break_left=True)
        freq = (freq + tl.where(s == top, rem, 0)).to(tl.int32)
        tl.store(freq_ptr + r * A + s, freq, mask=sm)
    else:
        freq = tl.load(in_ptr + r * A + s, mask=sm, other=0)
    cum = tl.cumsum(freq, 0) - freq
    fm1 = tl.maximum(freq - 1, 0)
    present = sm & (freq > 0)
    tl.store(dec_ptr + r * A + s, tl.where(present, fm1 | (cum << 14), 0), mask=sm)
    if FROM_COUNTS:
        lg = _bit_length(fm1)                                   # ceil(log2 f)
        f64 = tl.maximum(freq, 1).to(tl.int64)
        magic = (((tl.full([AP], 1, tl.int64) << lg.to(tl.int64)) - f64) << 32) // f64 + 1
        tl.store(enc_ptr + r * A + s, tl.where(present, fm1 | (cum << 14) | (lg << 28), 0), mask=sm)
        tl.store(mag_ptr + r * A + s, tl.where(present, magic, 0).to(tl.int32), mask=sm)
    if WANT_LUT:
        for sym in range(A):
            f = tl.sum(tl.where(s == sym, freq, 0), 0)
            c = tl.sum(tl.where(s == sym, cum, 0), 0)
            for st in range(0, f, LUT_BLOCK):
                j = st + tl.arange(0, LUT_BLOCK)
                tl.store(lut_ptr + r * 16384 + c + j, tl.full([LUT_BLOCK], sym, tl.uint8), mask=j < f)


@dataclass
class Tables:
    """Per-(segment, table) rANS tables on the device."""
    freq: torch.Tensor      # [R, A] int32, sums to 2^14
    enc: torch.Tensor       # [R, A] int32 packed encoder entries
    magic: torch.Tensor     # [R, A] int32 (uint32 bits)
    dec: torch.Tensor       # [R, A] int32 packed decoder entries
    lut: torch.Tensor | None  # [R, 2^14] uint8


def build_tables(src: torch.Tensor, from_counts: bool = True, want_lut: bool = False) -> Tables:
    if src.dtype != torch.int32 or src.dim() != 2 or not src.is_contiguous():
        raise ValueError("counts/frequencies must be contiguous int32 [num_tables, A]")
    r, a = src.shape
    freq = torch.empty_like(src) if from_counts else src
    enc = torch.empty_like(src) if from_counts else src
    magic = torch.empty_like(src) if from_counts else src
    dec = torch.empty_like(src)
    lut = torch.empty((r, 1 << PROB_BITS), dtype=torch.uint8, device=src.device) if want_lut else dec
    if r:
        _tables_kernel[(r,)](src, freq, enc, magic, dec, lut, A=a, AP=triton.next_power_of_2(a),
                             FROM_COUNTS=from_counts, WANT_LUT=want_lut, LUT_BLOCK=512)
    return Tables(freq, enc if from_counts else None, magic if from_counts else None, dec,
                  lut if want_lut else None)


@triton.jit
def _rans_encode_kernel(sym_ptr, enc_ptr, mag_ptr, buf_ptr, end_ptr, state_ptr,
                        n, num_groups, num_rows, steps, cap, num_tables,
                        TAB_DIV: tl.constexpr, TAB_MOD: tl.constexpr, A: tl.constexpr, GPP: tl.constexpr):
    rows = tl.program_id(0) * GPP + tl.arange(0, GPP)
    row_ok = rows < num_rows
    seg = rows // num_groups
    sym_row = sym_ptr + (seg.to(tl.int64) * n)[:, None]                      # pointers, hoisted
    buf_row = buf_ptr + rows.to(tl.int64)[:, None] * cap
    tab_base = (seg * num_tables)[:, None]
    lg = ((rows % num_groups) * 32)[:, None] + tl.arange(0, 32)[None, :]     # lane of each slot
    num_lanes = num_groups * 32
    x = tl.full([GPP, 32], 65536, tl.uint32)
    e = tl.zeros([GPP], tl.int32) + cap
    # pipeline: symbols two steps ahead, table entries one step ahead of the state chain
    i = lg + (steps - 1) * num_lanes
    act = (i < n) & row_ok[:, None]
    s = tl.load(sym_row + i, mask=act, other=0).to(tl.int32)
    ent = (tab_base + (i // TAB_DIV) % TAB_MOD) * A + s
    pk = tl.load(enc_ptr + ent, mask=act, other=0)
    mg = tl.load(mag_ptr + ent, mask=act, other=0)
    i1 = i - num_lanes
    s1 = tl.load(sym_row + i1, mask=(i1 >= 0) & row_ok[:, None], other=0).to(tl.int32)
    for tt in range(steps):
        t = steps - 1 - tt
        i = lg + t * num_lanes
        active = (i < n) & row_ok[:, None]
        i1 = i - num_lanes
        a1 = (i1 >= 0) & row_ok[:, None]
        ent1 = (tab_base + (i1 // TAB_DIV) % TAB_MOD) * A + s1
        pk1 = tl.load(enc_ptr + ent1, mask=a1, other=0)
        mg1 = tl.load(mag_ptr + ent1, mask=a1, other=0)
        i2 = i1 - num_lanes
        s2 = tl.load(sym_row + i2, mask=(i2 >= 0) & row_ok[:, None], other=0).to(tl.int32)
        # state chain of step t
        f = tl.where(active, (pk & 16383) + 1, 1).to(tl.uint32)
        c = ((pk >> 14) & 16383).to(tl.uint32)
        lsh = ((pk >> 28) & 15).to(tl.uint32)
        need = active & ((x >> 18) >= f)
        ni = need.to(tl.int32)
        rank = tl.cumsum(ni, axis=1) - ni
        k = tl.sum(ni, axis=1)
        pos = (e - k)[:, None] + rank
        tl.store(buf_row + pos, (x & 0xFFFF).to(tl.int16), mask=need)
        e = e - k
        x = tl.where(need, x >> 16, x)
        hi = tl.umulhi(x, mg.to(tl.uint32, bitcast=True))
        q = (hi + ((x - hi) >> tl.minimum(lsh, 1))) >> tl.maximum(lsh, 1) - 1
        x = tl.where(active, (q << 14) + (x - q * f) + c, x)
        pk, mg, s1 = pk1, mg1, s2
    tl.store(end_ptr + rows, e, mask=row_ok)
    tl.store(state_ptr + rows.to(tl.int64)[:, None] * 32 + tl.arange(0, 32)[None, :], x.to(tl.int32, bitcast=True),
             mask=row_ok[:, None])


@triton.jit
def _group(i, GDIV: tl.constexpr, GMOD: tl.constexpr):
    """(i // GDIV) % GMOD with compile-time divisors (GMOD 0: no wrap, i // GDIV is in range)."""
    if GMOD == 0:
        return i // GDIV
    else:
        return (i // GDIV) % GMOD


@triton.jit
def _exclusive_prefix(cnt_ptr, rows, num_rows, GPP: tl.constexpr, BLOCK: tl.constexpr):
    """Sum of cnt[r] over r < row, for each row of `rows` ([GPP] int32)."""
    acc = tl.zeros([GPP], tl.int32)
    for r0 in range(0, num_rows, BLOCK):
        r = r0 + tl.arange(0, BLOCK)
        c = tl.load(cnt_ptr + r, mask=r < num_rows, other=0)
        acc += tl.sum(tl.where(r[None, :] < rows[:, None], c[None, :], 0), 1)
    return acc


@triton.jit
def _compact_kernel(buf_ptr, end_ptr, cnt_ptr, out_ptr, total_ptr, num_rows, cap, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    e = tl.load(end_ptr + row)
    off = tl.sum(_exclusive_prefix(end_ptr, tl.full([1], 0, tl.int32) + row, num_rows, 1, BLOCK), 0)
    off = row * cap - off      # end_ptr holds ends; counts are cap - end
    cnt = cap - e
    tl.store(cnt_ptr + row, cnt)
    if row == num_rows - 1:
        tl.store(total_ptr, off + cnt)
    for st in range(0, cnt, BLOCK):
        j = st + tl.arange(0, BLOCK)
        m = j < cnt
        w = tl.load(buf_ptr + row.to(tl.int64) * cap + e + j, mask=m)
        tl.store(out_ptr + off + j, w, mask=m)


@triton.jit
def _rans_decode_kernel(words_ptr, cnt_ptr, state_ptr, dec_ptr, lut_ptr, step_ptr, out_ptr, flag_ptr, total_words,
                        n, num_groups, num_rows, steps, num_tables, num_g, lim,
                        TAB_DIV: tl.constexpr, TAB_MOD: tl.constexpr, GDIV_K: tl.constexpr, GMOD_K: tl.constexpr,
                        GDIV_V: tl.constexpr, GMOD_V: tl.constexpr, A: tl.constexpr, MAX_Q: tl.constexpr, VALUES: tl.constexpr, GATHER: tl.constexpr,
                        GPP: tl.constexpr):
    rows = tl.program_id(0) * GPP + tl.arange(0, GPP)
    row_ok = rows < num_rows
    seg = rows // num_groups
    out_row = out_ptr + (seg.to(tl.int64) * n)[:, None]                      # pointers, hoisted
    tab_base = (seg * num_tables)[:, None]
    lg = ((rows % num_groups) * 32)[:, None] + tl.arange(0, 32)[None, :]
    num_lanes = num_groups * 32
    lane32 = tl.arange(0, 32)[None, :]
    x = tl.load(state_ptr + rows.to(tl.int64)[:, None] * 32 + lane32, mask=row_ok[:, None],
                other=65536).to(tl.uint32, bitcast=True)
    p = _exclusive_prefix(cnt_ptr, rows, num_rows, GPP, 1024)
    stop = p + tl.load(cnt_ptr + rows, mask=row_ok, other=0)
    num_esc = tl.zeros([GPP], tl.int32)
    if VALUES:
        is_v = (seg % 2)[:, None] == 1
        step_base = (seg.to(tl.int64) * num_g)[:, None]
    for t in range(steps):
        i = lg + t * num_lanes
        active = (i < n) & row_ok[:, None]
        if GATHER:   # the words this group could take now, before the state says which lanes need one
            pre = tl.load(words_ptr + tl.minimum(p[:, None] + lane32, total_words - 1))
        tab = tab_base + (i // TAB_DIV) % TAB_MOD
        slot = x & 16383
        s = tl.load(lut_ptr + tab * 16384 + slot, mask=active, other=0).to(tl.int32)
        pk = tl.load(dec_ptr + tab * A + s, mask=active, other=0)
        f = ((pk & 16383) + 1).to(tl.uint32)
        c = ((pk >> 14) & 16383).to(tl.uint32)
        x = tl.where(active, f * (x >> 14) + (slot - c), x)
        if VALUES:
            step = tl.load(step_ptr + step_base + tl.where(is_v, _group(i, GDIV_V, GMOD_V), _group(i, GDIV_K, GMOD_K)),
                           mask=active, other=1.0)
            is_esc = s == 2 * MAX_Q + 1
            q = tl.where(is_esc, 0, s - MAX_Q)
            v = tl.minimum(tl.maximum(q.to(tl.float32) * step, -lim), lim)
            v = tl.where(is_esc, float("nan"), v)       # escape slot: NaN until the exact value lands
            num_esc += tl.sum((is_esc & active).to(tl.int32), 1)
            tl.store(out_row + i, _cast_rne(v, out_ptr.dtype.element_ty), mask=active)
        else:
            tl.store(out_row + i, s.to(tl.uint8), mask=active)
        need = active & (x < 65536)
        ni = need.to(tl.int32)
        rank = tl.cumsum(ni, axis=1) - ni
        if GATHER:
            w = tl.gather(pre, rank, 1)
        else:
            w = tl.load(words_ptr + tl.minimum(p[:, None] + rank, total_words - 1), mask=need, other=0)
        w = (w.to(tl.int32) & 0xFFFF).to(tl.uint32)
        x = tl.where(need, (x << 16) | w, x)
        p = p + tl.sum(ni, axis=1)
    bad = tl.sum(((x != 65536) & row_ok[:, None]).to(tl.int32), 1) + ((p != stop) & row_ok).to(tl.int32)
    nbad = tl.sum(bad, 0)
    if nbad > 0:
        tl.atomic_max(flag_ptr, 1)
    if VALUES:
        tl.atomic_add(flag_ptr + 1 + seg, num_esc, mask=row_ok & (num_esc > 0))


def _launch_opts(gpp: int | None, rows: int) -> dict[str, int]:
    """Groups per program: one warp per group was fastest at 256 and 2048 tokens (H200, docs/codec.md)."""
    if gpp is None:
        gpp = 1
    return {"GPP": gpp, "num_warps": max(1, min(gpp, 4))}


def _num_programs(rows: int, opts: dict[str, int]) -> tuple[int]:
    return (triton.cdiv(rows, opts["GPP"]),)


def rans_encode(syms: torch.Tensor, tables: Tables, num_tables: int, tab_div: int, tab_mod: int, lane_len: int,
                gpp: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if syms.dtype != torch.uint8 or syms.dim() != 2 or not syms.is_contiguous():
        raise ValueError("syms must be contiguous uint8 [S, n]")
    if tables.enc is None or tables.enc.device != syms.device:
        raise ValueError("encoder tables (build_tables(counts)) must be on the symbols' device")
    s_count, n = syms.shape
    num_groups, _, steps = plan_lanes(n, lane_len)
    rows = s_count * num_groups
    cap = steps * GROUP
    dev = syms.device
    buf = torch.empty(rows * cap, dtype=torch.int16, device=dev)
    end = torch.empty(rows, dtype=torch.int32, device=dev)
    states = torch.empty(rows * GROUP, dtype=torch.int32, device=dev)
    opts = _launch_opts(gpp, rows)
    _rans_encode_kernel[_num_programs(rows, opts)](
        syms, tables.enc, tables.magic, buf, end, states, n, num_groups, rows, steps, cap, num_tables,
        TAB_DIV=tab_div, TAB_MOD=tab_mod, A=tables.enc.shape[1], **opts)
    counts = torch.empty(rows, dtype=torch.int32, device=dev)
    total = torch.empty(1, dtype=torch.int32, device=dev)
    words = torch.empty(rows * cap, dtype=torch.int16, device=dev)
    _compact_kernel[(rows,)](buf, end, counts, words, total, rows, cap, BLOCK=1024)
    return words, counts, total, states


def rans_decode(words: torch.Tensor, counts: torch.Tensor, states: torch.Tensor, tables: Tables, s_count: int,
                n: int, num_tables: int, tab_div: int, tab_mod: int, lane_len: int, *, values: dict | None = None,
                gather: bool = True, gpp: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (syms uint8 [S, n], or values [S, n] when `values` = {step [S, G] fp32, k: (gdiv, gmod),
    v: (gdiv, gmod), max_q, dtype}, and int32 flags: [0] is 1 when any lane did not end cleanly;
    with values, [1 + s] counts segment s's escape symbols, whose slots come out NaN)."""
    if tables.lut is None:
        raise ValueError("decoder tables need the slot lookup (build_tables(..., want_lut=True))")
    num_groups, _, steps = plan_lanes(n, lane_len)
    rows = s_count * num_groups
    if counts.numel() != rows or states.numel() != rows * GROUP:
        raise ValueError(f"expected {rows} group counts and {rows * GROUP} states")
    dev = words.device
    flag = torch.zeros(1 if values is None else 1 + s_count, dtype=torch.int32, device=dev)
    w = words if words.numel() else torch.zeros(1, dtype=torch.int16, device=dev)
    if values is None:
        out = torch.empty((s_count, n), dtype=torch.uint8, device=dev)
        step, gk, gv, max_q, lim = out, (1, 0), (1, 0), 0, 0.0
    else:
        out = torch.empty((s_count, n), dtype=values["dtype"], device=dev)
        step, gk, gv, max_q = values["step"], values["k"], values["v"], values["max_q"]
        lim = float(torch.finfo(values["dtype"]).max)
    opts = _launch_opts(gpp, rows)
    _rans_decode_kernel[_num_programs(rows, opts)](
        w, counts.to(torch.int32), states.to(torch.int32), tables.dec, tables.lut, step, out, flag, w.numel(),
        n, num_groups, rows, steps, num_tables, step.shape[1] if values is not None else 1, lim,
        TAB_DIV=tab_div, TAB_MOD=tab_mod, GDIV_K=gk[0], GMOD_K=gk[1], GDIV_V=gv[0], GMOD_V=gv[1],
        A=tables.dec.shape[1], MAX_Q=max_q, VALUES=values is not None, GATHER=gather, **opts)
    return out, flag
