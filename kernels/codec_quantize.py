"""KV scales, quantize + histogram, dequantize on the GPU, all layers of a request per launch.
Same integers and bytes as the CPU reference (kvtransfer/codec/quant.py): scales come from an
exact integer mean (mantissas shifted by integer ops, summed in int32/int64), steps are one fp32
multiply of an exactly built power-of-two scale, inverse steps are correctly rounded divisions,
and rounding is compare-only (no arithmetic on the product, so no fused multiply-add can change
a symbol).

Datasheet
---------
Input `kv` [L, 2, T, H, D] contiguous fp16/bf16/fp32 (K at 1 index 0, V at 1); segment
s = 2 * layer + j. Only tokens [lo, hi) are quantized (the others are sent exact), but every
token is checked for inf/NaN. Scale modes per K/V (constexpr): HEAD (one group per head over all
tokens), CHANNEL (per head and channel over all tokens), TOKEN_HEAD (per token and head).

    scale_stats(kv, lo, hi, k_mode, v_mode, ws)         launch 1 (+ launch 2 for HEAD/CHANNEL)
        HEAD/CHANNEL: atomic max of |x| bits, then atomic int64 sum of the fixed-point mantissas
        TOKEN_HEAD:   each row's code directly, and the atomic max code per segment
    quantize_histogram(kv, lo, hi, alpha_band, ws, ...) launch 3
        -> syms uint8 [S, n], rel uint8 [S, GMAX] (scale side info), step fp32 [S, GMAX],
           base int32 [S] (+ CODE_OFFSET), counts int32 [S * H, A] (per (segment, head) tables)
    (decoding's dequantize and re-counting histograms: kernels/codec_symbols.py)
Flat element i of a segment's quantized part: token lo + i // (H * D), head (i // D) % H.
Grids: (S, cdiv(tokens, TOK_PER_PROG)); each program walks its tokens in [BT, HP, DP] tiles and
issues its atomics once (per-program histograms via tl.histogram).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["MODES", "CODE_OFFSET", "Workspace", "scale_stats", "quantize_histogram"]

MODES = {"head": 0, "channel": 1, "token_head": 2}
CODE_OFFSET = 4096      # codes are >= -1400; base is kept as code + CODE_OFFSET > 0 (zero-init atomics)
FRAC_BITS = 20
CODE_ZERO = -800
TOK_PER_PROG = 32


@triton.jit
def _frexp_exp(bits):
    """Exponent E of frexp(|x|) (|x| = f * 2^E, f in [0.5, 1)) from |x|'s fp32 bits (> 0)."""
    e = (bits >> 23) & 255
    mant = bits & 0x7FFFFF
    sub_len = ((mant.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 255) - 126  # bit length of mant
    return tl.where(e > 0, e - 126, sub_len - 149)


@triton.jit
def _fixed_mantissa(bits, big_e):
    """floor(|x| * 2^(20 - E)) from |x|'s fp32 bits (|x| < 2^E), by integer shifts only."""
    e = (bits >> 23) & 255
    m = tl.where(e > 0, (bits & 0x7FFFFF) | 0x800000, bits & 0x7FFFFF)
    ex = tl.where(e > 0, e - 127, -126)
    sh = big_e + 3 - ex
    return tl.where(sh < 31, m >> tl.minimum(sh, 31), 0)


@triton.jit
def _code(amax_bits, total, count):
    """1/8-octave log code of mean |x| (see quant.meanabs_codes)."""
    big_e = _frexp_exp(tl.maximum(amax_bits, 1))
    mean = tl.maximum(total // count, 1).to(tl.int32)
    b = ((mean.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 255) - 126   # bit length of mean
    frac = tl.where(b >= 4, mean >> tl.maximum(b - 4, 0), mean << tl.maximum(4 - b, 0)) & 7
    code = 8 * (b - 1 + big_e - 20) + frac
    return tl.where(amax_bits > 0, code, -800)


@triton.jit
def _scale_bits(code):
    """fp32 scale 2^(code >> 3) * (1 + (code % 8 + 0.5) / 8), built from bits (exact)."""
    e = tl.minimum(tl.maximum(code >> 3, -100), 100)
    return (((e + 127) << 23) | ((1 + 2 * (code & 7)) << 19)).to(tl.float32, bitcast=True)


@triton.jit
def _tile(kv_ptr, seg, t0, T, H, D, BT: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr):
    """Offsets and in-range mask of the [BT, HP, DP] tile at token t0 of segment seg."""
    tt = t0 + tl.arange(0, BT)[:, None, None]
    hh = tl.arange(0, HP)[None, :, None]
    dd = tl.arange(0, DP)[None, None, :]
    ok = (tt < T) & (hh < H) & (dd < D)
    off = seg.to(tl.int64) * T * H * D + tt.to(tl.int64) * H * D + hh * D + dd
    return off, ok, tt, hh, dd


@triton.jit
def _stats_pass(kv_ptr, amax_ptr, sums_ptr, codes_ptr, base_ptr, flag_ptr, seg, t_begin, t_end, lo, hi, T, H, D,
                GMAX, MODE: tl.constexpr, SECOND: tl.constexpr, BT: tl.constexpr, HP: tl.constexpr,
                DP: tl.constexpr):
    hv = tl.arange(0, HP)[:, None]
    dv = tl.arange(0, DP)[None, :]
    if MODE == 0:
        gid = hv + dv * 0                                         # [HP, DP] group of each column
    else:
        gid = hv * D + dv
    gok = (hv < H) & (dv < D)
    # per-element accumulators, reduced once after the loop (a cross-warp reduction per tile
    # costs a shared-memory round trip and a barrier); mantissa sums fit int32 over one program's
    # tokens (< 2^24 each, TOK_PER_PROG of them)
    acc_max = tl.zeros([BT, HP, DP], tl.int32)
    acc_sum = tl.zeros([BT, HP, DP], tl.int32)
    big_e = tl.zeros([HP, DP], tl.int32)
    if SECOND:
        big_e = _frexp_exp(tl.maximum(tl.load(amax_ptr + seg * GMAX + gid, mask=gok, other=1), 1))
    row_max = tl.full([BT, HP], -2147483647, tl.int32)
    bad = tl.zeros([BT, HP, DP], tl.int32)
    for t0 in range(t_begin, t_end, BT):
        off, ok, tt, hh, dd = _tile(kv_ptr, seg, t0, T, H, D, BT, HP, DP)
        x = tl.load(kv_ptr + off, mask=ok & (tt < t_end), other=0).to(tl.float32)
        bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        qok = ok & (tt >= lo) & (tt < hi) & (tt < t_end)
        if not SECOND:
            bad = tl.maximum(bad, ((bits >= 0x7F800000) & ok & (tt < t_end)).to(tl.int32))
        if MODE == 2:
            if not SECOND:
                ramax = tl.max(tl.where(qok, bits, 0), 2)                       # [BT, HP]
                m = _fixed_mantissa(bits, _frexp_exp(tl.maximum(ramax, 1))[:, :, None])
                rsum = tl.sum(tl.where(qok, m, 0), 2)
                code = _code(ramax, rsum, D)
                t2 = t0 + tl.arange(0, BT)[:, None]
                h2 = tl.arange(0, HP)[None, :]
                rok = (t2 >= lo) & (t2 < hi) & (h2 < H) & (t2 < t_end)
                tl.store(codes_ptr + seg * GMAX + (t2 - lo) * H + h2, code, mask=rok)
                row_max = tl.maximum(row_max, tl.where(rok, code, -2147483647))
        else:
            if SECOND:
                acc_sum += tl.where(qok, _fixed_mantissa(bits, big_e[None, :, :]), 0)
            else:
                acc_max = tl.maximum(acc_max, tl.where(qok, bits, 0))
    if not SECOND:
        if tl.max(tl.max(tl.max(bad, 2), 1), 0) > 0:
            tl.atomic_max(flag_ptr, 1)
    if MODE == 2:
        if not SECOND:
            tl.atomic_max(base_ptr + seg, tl.max(tl.max(row_max, 1), 0) + 4096)
    elif MODE == 0:
        if SECOND:
            tl.atomic_add(sums_ptr + seg * GMAX + tl.arange(0, HP),
                          tl.sum(tl.sum(acc_sum.to(tl.int64), 0), 1), mask=tl.arange(0, HP) < H)
        else:
            tl.atomic_max(amax_ptr + seg * GMAX + tl.arange(0, HP), tl.max(tl.max(acc_max, 0), 1),
                          mask=tl.arange(0, HP) < H)
    else:
        if SECOND:
            tl.atomic_add(sums_ptr + seg * GMAX + gid, tl.sum(acc_sum.to(tl.int64), 0), mask=gok)
        else:
            tl.atomic_max(amax_ptr + seg * GMAX + gid, tl.max(acc_max, 0), mask=gok)


@triton.jit
def _stats_kernel(kv_ptr, amax_ptr, sums_ptr, codes_ptr, base_ptr, flag_ptr, lo, hi, T, H, D, GMAX, span,
                  K_MODE: tl.constexpr, V_MODE: tl.constexpr, SECOND: tl.constexpr, BT: tl.constexpr,
                  HP: tl.constexpr, DP: tl.constexpr):
    seg = tl.program_id(0)
    if SECOND:
        t_begin = lo + tl.program_id(1) * span
        t_end = tl.minimum(t_begin + span, hi)
    else:
        t_begin = tl.program_id(1) * span
        t_end = tl.minimum(t_begin + span, T)
    if seg % 2 == 0:
        if (not SECOND) or K_MODE != 2:
            _stats_pass(kv_ptr, amax_ptr, sums_ptr, codes_ptr, base_ptr, flag_ptr, seg, t_begin, t_end, lo, hi, T,
                        H, D, GMAX, K_MODE, SECOND, BT, HP, DP)
    else:
        if (not SECOND) or V_MODE != 2:
            _stats_pass(kv_ptr, amax_ptr, sums_ptr, codes_ptr, base_ptr, flag_ptr, seg, t_begin, t_end, lo, hi, T,
                        H, D, GMAX, V_MODE, SECOND, BT, HP, DP)


@triton.jit
def _quant_pass(kv_ptr, amax_ptr, sums_ptr, codes_ptr, base_ptr, rel_ptr, step_ptr, sym_ptr, counts_ptr, al,
                seg, t_begin, t_end, lo, hi, T, H, D, GMAX, n, MODE: tl.constexpr, MAX_Q: tl.constexpr,
                A: tl.constexpr, AP: tl.constexpr, BT: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr):
    tq = hi - lo
    hv = tl.arange(0, HP)[:, None]
    dv = tl.arange(0, DP)[None, :]
    gok = (hv < H) & (dv < D)
    inv_g = tl.zeros([HP, DP], tl.float32)
    if MODE != 2:   # one step per head or channel for the whole segment: build it once
        if MODE == 0:
            gid = hv + dv * 0
            cnt = tq * D
            wmask = gok & (dv == 0)
        else:
            gid = hv * D + dv
            cnt = tq
            wmask = gok
        code = _code(tl.load(amax_ptr + seg * GMAX + gid, mask=gok, other=0),
                     tl.load(sums_ptr + seg * GMAX + gid, mask=gok, other=0), cnt)
        base = tl.max(tl.max(tl.where(gok, code, -2147483647), 1), 0)
        rel = tl.minimum(base - code, 255)
        step = al * _scale_bits(base - rel)
        step = tl.where(step > 0, step, 1.0)
        inv_g = tl.math.div_rn(tl.full([HP, DP], 1.0, tl.float32), step)
        if t_begin == lo:
            tl.store(rel_ptr + seg * GMAX + gid, rel.to(tl.uint8), mask=wmask)
            tl.store(step_ptr + seg * GMAX + gid, step, mask=wmask)
            tl.store(base_ptr + seg, base + 4096)
    else:
        base = tl.load(base_ptr + seg) - 4096
    hist = tl.zeros([HP * AP], tl.int32)
    num_pad = 0
    for t0 in range(t_begin, t_end, BT):
        off, ok, tt, hh, dd = _tile(kv_ptr, seg, t0, T, H, D, BT, HP, DP)
        ok = ok & (tt < t_end)
        x = tl.load(kv_ptr + off, mask=ok, other=0).to(tl.float32)
        if MODE == 2:
            t2 = t0 + tl.arange(0, BT)[:, None]
            h2 = tl.arange(0, HP)[None, :]
            rok = (t2 < t_end) & (h2 < H)
            r = (t2 - lo) * H + h2
            code = tl.load(codes_ptr + seg * GMAX + r, mask=rok, other=0)
            rel = tl.minimum(base - code, 255)
            step = al * _scale_bits(base - rel)
            step = tl.where(step > 0, step, 1.0)
            inv = tl.math.div_rn(tl.full([BT, HP], 1.0, tl.float32), step)
            tl.store(rel_ptr + seg * GMAX + r, rel.to(tl.uint8), mask=rok)
            tl.store(step_ptr + seg * GMAX + r, step, mask=rok)
            y = x * inv[:, :, None]
        else:
            y = x * inv_g[None, :, :]
        y = tl.minimum(tl.maximum(y, -1048576.0), 1048576.0)
        t = y.to(tl.int32)                      # truncates toward zero
        tf = t.to(tl.float32)
        q = t + (y >= tf + 0.5).to(tl.int32) - (y <= tf - 0.5).to(tl.int32)
        esc = (q > MAX_Q) | (q < -MAX_Q)
        sym = tl.where(esc, 2 * MAX_Q + 1, q + MAX_Q)
        i = (tt - lo).to(tl.int64) * H * D + hh * D + dd
        tl.store(sym_ptr + seg.to(tl.int64) * n + i, sym.to(tl.uint8), mask=ok)
        key = tl.where(ok, hh * AP + sym, 0)
        hist += tl.histogram(tl.reshape(key, [BT * HP * DP]), HP * AP)
        num_pad += BT * HP * DP - tl.sum(tl.sum(tl.sum(ok.to(tl.int32), 2), 1), 0)
    bins = tl.arange(0, HP * AP)
    hist = hist - tl.where(bins == 0, num_pad, 0)
    bh, bs = bins // AP, bins % AP
    tl.atomic_add(counts_ptr + seg * H * A + bh * A + bs, hist, mask=(hist != 0) & (bh < H) & (bs < A))


@triton.jit
def _quant_head_pass(kv_ptr, amax_ptr, sums_ptr, codes_ptr, base_ptr, rel_ptr, step_ptr, sym_ptr, counts_ptr, al,
                     seg, t_begin, t_end, lo, hi, T, H, D, GMAX, n, MODE: tl.constexpr, MAX_Q: tl.constexpr,
                     A: tl.constexpr, AP: tl.constexpr, BT: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr):
    """_quant_pass with one head per tile ([BT, DP]) and one A-bin histogram per head: the same
    symbols, scales and counts, but tl.histogram over AP bins instead of H * AP (its cost grows
    with the bin count)."""
    tq = hi - lo
    hv = tl.arange(0, HP)[:, None]
    dv = tl.arange(0, DP)[None, :]
    gok = (hv < H) & (dv < D)
    inv_g = tl.zeros([HP, DP], tl.float32)
    if MODE != 2:
        if MODE == 0:
            gid = hv + dv * 0
            cnt = tq * D
            wmask = gok & (dv == 0)
        else:
            gid = hv * D + dv
            cnt = tq
            wmask = gok
        code = _code(tl.load(amax_ptr + seg * GMAX + gid, mask=gok, other=0),
                     tl.load(sums_ptr + seg * GMAX + gid, mask=gok, other=0), cnt)
        base = tl.max(tl.max(tl.where(gok, code, -2147483647), 1), 0)
        rel = tl.minimum(base - code, 255)
        step = al * _scale_bits(base - rel)
        step = tl.where(step > 0, step, 1.0)
        inv_g = tl.where(gok, tl.math.div_rn(tl.full([HP, DP], 1.0, tl.float32), step), 0.0)
        if t_begin == lo:
            tl.store(rel_ptr + seg * GMAX + gid, rel.to(tl.uint8), mask=wmask)
            tl.store(step_ptr + seg * GMAX + gid, step, mask=wmask)
            tl.store(base_ptr + seg, base + 4096)
    else:
        base = tl.load(base_ptr + seg) - 4096
    d1 = tl.arange(0, DP)
    t1 = tl.arange(0, BT)
    bins = tl.arange(0, AP)
    for h in range(0, H):
        inv_row = tl.sum(tl.where(hv == h, inv_g, 0.0), 0)          # [DP]: exact (one nonzero term)
        hist = tl.zeros([AP], tl.int32)
        num_pad = 0
        for t0 in range(t_begin, t_end, BT):
            tt = t0 + t1
            ok = (tt < t_end)[:, None] & (d1 < D)[None, :]
            off = seg.to(tl.int64) * T * H * D + tt.to(tl.int64)[:, None] * H * D + h * D + d1[None, :]
            x = tl.load(kv_ptr + off, mask=ok, other=0).to(tl.float32)
            if MODE == 2:
                rok = tt < t_end
                r = (tt - lo) * H + h
                code = tl.load(codes_ptr + seg * GMAX + r, mask=rok, other=0)
                rel = tl.minimum(base - code, 255)
                step = al * _scale_bits(base - rel)
                step = tl.where(step > 0, step, 1.0)
                inv = tl.math.div_rn(tl.full([BT], 1.0, tl.float32), step)
                tl.store(rel_ptr + seg * GMAX + r, rel.to(tl.uint8), mask=rok)
                tl.store(step_ptr + seg * GMAX + r, step, mask=rok)
                y = x * inv[:, None]
            else:
                y = x * inv_row[None, :]
            y = tl.minimum(tl.maximum(y, -1048576.0), 1048576.0)
            t = y.to(tl.int32)                      # truncates toward zero
            tf = t.to(tl.float32)
            q = t + (y >= tf + 0.5).to(tl.int32) - (y <= tf - 0.5).to(tl.int32)
            esc = (q > MAX_Q) | (q < -MAX_Q)
            sym = tl.where(esc, 2 * MAX_Q + 1, q + MAX_Q)
            i = (tt - lo).to(tl.int64)[:, None] * H * D + h * D + d1[None, :]
            tl.store(sym_ptr + seg.to(tl.int64) * n + i, sym.to(tl.uint8), mask=ok)
            hist += tl.histogram(tl.reshape(tl.where(ok, sym, 0), [BT * DP]), AP)
            num_pad += BT * DP - tl.minimum(t_end - t0, BT) * D          # masked slots counted as bin 0
        hist = hist - tl.where(bins == 0, num_pad, 0)
        tl.atomic_add(counts_ptr + (seg * H + h) * A + bins, hist, mask=(hist != 0) & (bins < A))


@triton.jit
def _quant_kernel(kv_ptr, amax_ptr, sums_ptr, codes_ptr, base_ptr, rel_ptr, step_ptr, sym_ptr, counts_ptr, al_ptr,
                  lo, hi, T, H, D, GMAX, n, span, K_MODE: tl.constexpr, V_MODE: tl.constexpr, MAX_Q: tl.constexpr,
                  A: tl.constexpr, AP: tl.constexpr, BT: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr,
                  PER_HEAD: tl.constexpr):
    seg = tl.program_id(0)
    t_begin = lo + tl.program_id(1) * span
    t_end = tl.minimum(t_begin + span, hi)
    al = tl.load(al_ptr + seg)
    if PER_HEAD:
        if seg % 2 == 0:
            _quant_head_pass(kv_ptr, amax_ptr, sums_ptr, codes_ptr, base_ptr, rel_ptr, step_ptr, sym_ptr, counts_ptr,
                             al, seg, t_begin, t_end, lo, hi, T, H, D, GMAX, n, K_MODE, MAX_Q, A, AP, BT, HP, DP)
        else:
            _quant_head_pass(kv_ptr, amax_ptr, sums_ptr, codes_ptr, base_ptr, rel_ptr, step_ptr, sym_ptr, counts_ptr,
                             al, seg, t_begin, t_end, lo, hi, T, H, D, GMAX, n, V_MODE, MAX_Q, A, AP, BT, HP, DP)
    else:
        if seg % 2 == 0:
            _quant_pass(kv_ptr, amax_ptr, sums_ptr, codes_ptr, base_ptr, rel_ptr, step_ptr, sym_ptr, counts_ptr, al,
                        seg, t_begin, t_end, lo, hi, T, H, D, GMAX, n, K_MODE, MAX_Q, A, AP, BT, HP, DP)
        else:
            _quant_pass(kv_ptr, amax_ptr, sums_ptr, codes_ptr, base_ptr, rel_ptr, step_ptr, sym_ptr, counts_ptr, al,
                        seg, t_begin, t_end, lo, hi, T, H, D, GMAX, n, V_MODE, MAX_Q, A, AP, BT, HP, DP)


class Workspace:
    """Device buffers of one quantize call ([S, GMAX] per-group scratch and side info)."""

    def __init__(self, s_count: int, gmax: int, num_heads: int, alphabet: int, device: torch.device) -> None:
        # one memset for every zero-initialized int32 buffer: amax bits, base, flag, histogram
        z = torch.zeros(s_count * gmax + s_count + 1 + s_count * num_heads * alphabet, dtype=torch.int32,
                        device=device)
        self.amax = z[:s_count * gmax]
        self.base = z[s_count * gmax:s_count * gmax + s_count]
        self.flag = z[s_count * gmax + s_count:s_count * gmax + s_count + 1]
        self.counts = z[s_count * gmax + s_count + 1:].view(s_count * num_heads, alphabet)
        self.sums = torch.zeros(s_count * gmax, dtype=torch.int64, device=device)
        self.codes = torch.empty(s_count * gmax, dtype=torch.int32, device=device)
        self.rel = torch.empty((s_count, gmax), dtype=torch.uint8, device=device)
        self.step = torch.empty((s_count, gmax), dtype=torch.float32, device=device)
        self.gmax = gmax


def _tile_shape(h: int, d: int) -> tuple[int, int, int]:
    hp, dp = triton.next_power_of_2(h), triton.next_power_of_2(d)
    return max(1, 4096 // (hp * dp)), hp, dp


def scale_stats(kv: torch.Tensor, lo: int, hi: int, k_mode: int, v_mode: int, ws: Workspace) -> None:
    if kv.dim() != 5 or kv.shape[1] != 2 or not kv.is_contiguous():
        raise ValueError("kv must be contiguous [L, 2, T, H, D]")
    nl, _, t, h, d = kv.shape
    bt, hp, dp = _tile_shape(h, d)
    grid = (2 * nl, triton.cdiv(t, TOK_PER_PROG))
    _stats_kernel[grid](kv, ws.amax, ws.sums, ws.codes, ws.base, ws.flag, lo, hi, t, h, d, ws.gmax, TOK_PER_PROG,
                        K_MODE=k_mode, V_MODE=v_mode, SECOND=False, BT=bt, HP=hp, DP=dp)
    if k_mode != 2 or v_mode != 2:
        grid = (2 * nl, triton.cdiv(hi - lo, TOK_PER_PROG))
        _stats_kernel[grid](kv, ws.amax, ws.sums, ws.codes, ws.base, ws.flag, lo, hi, t, h, d, ws.gmax,
                            TOK_PER_PROG, K_MODE=k_mode, V_MODE=v_mode, SECOND=True, BT=bt, HP=hp, DP=dp)


def quantize_histogram(kv: torch.Tensor, lo: int, hi: int, alpha_band: torch.Tensor, k_mode: int, v_mode: int,
                       max_q: int, ws: Workspace, per_head: bool = True) -> torch.Tensor:
    """-> syms uint8 [S, (hi - lo) * H * D]; fills ws.rel / ws.step / ws.base / ws.counts.
    alpha_band: fp32 [S], fp32(alpha * band multiplier) of each segment. per_head: one head per
    tile and an A-bin histogram per head (False: [BT, H, D] tiles, one H * A-bin histogram)."""
    nl, _, t, h, d = kv.shape
    n = (hi - lo) * h * d
    syms = torch.empty((2 * nl, n), dtype=torch.uint8, device=kv.device)
    if n:
        bt, hp, dp = _tile_shape(h, d)
        if per_head:
            bt = min(max(1, 4096 // dp), TOK_PER_PROG)
        grid = (2 * nl, triton.cdiv(hi - lo, TOK_PER_PROG))
        _quant_kernel[grid](kv, ws.amax, ws.sums, ws.codes, ws.base, ws.rel, ws.step, syms, ws.counts, alpha_band,
                            lo, hi, t, h, d, ws.gmax, n, TOK_PER_PROG, K_MODE=k_mode, V_MODE=v_mode, MAX_Q=max_q,
                            A=2 * max_q + 2, AP=triton.next_power_of_2(2 * max_q + 2), BT=bt, HP=hp, DP=dp,
                            PER_HEAD=per_head)
    return syms
