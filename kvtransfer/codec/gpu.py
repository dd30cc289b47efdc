"""GPU encoder/decoder for the `quant` and `lossless` kinds: the Triton kernels in
kernels/codec_*.py plus exact torch ops for scales and tables. Produces byte-identical
layer sections to the CPU reference (tests/kernels/test_codec_kernels.py checks it).

Input is the transfer layer's gather output for one token range:
    kv: [num_layers, 2, num_tokens, num_kv_heads, head_dim] on the device (K at 0, V at 1)
`encode_device` stops at device buffers (what the speed benchmark times); `payloads` copies
them to the host and builds the msgpack-ready layer payloads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvtransfer.codec import quant, rans
from kvtransfer.codec.errors import CodecError
from kvtransfer.codec.format import INT_VIEW, StreamHeader
from kvtransfer.codec.layer_codec import exact_token_mask

Tensor = torch.Tensor


def _meanabs_codes(a: Tensor) -> Tensor:
    """[..., m] |x| fp32 -> [...] int64 codes, the same integers as quant.meanabs_codes."""
    amax = a.amax(-1)
    e = torch.frexp(amax).exponent.to(torch.int64)
    mi = torch.floor(torch.ldexp(a.double(), (quant.FRAC_BITS - e).unsqueeze(-1).double())).to(torch.int64)
    mean = torch.clamp(mi.sum(-1) // a.shape[-1], min=1)
    b = torch.frexp(mean.double()).exponent.to(torch.int64)
    frac = torch.where(b >= 4, mean >> torch.clamp(b - 4, min=0), mean << torch.clamp(4 - b, min=0)) & 7
    code = 8 * (b - 1 + e - quant.FRAC_BITS) + frac
    return torch.where(amax > 0, code, torch.full_like(code, quant.CODE_ZERO))


def _decode_codes(code: Tensor) -> Tensor:
    e = torch.clamp(code >> 3, -100, 100)
    frac = (code & 7).to(torch.float32)
    return torch.ldexp(1.0 + (frac + 0.5) / 8.0, e.to(torch.float32)).to(torch.float32)


def _group_layout(mode: str, tq: int, hh: int, d: int) -> tuple[int, int, int]:
    """(num_groups, gdiv, gmod) of a scale mode over a flat [Tq, H, D] segment."""
    return {"head": (hh, d, hh), "channel": (hh * d, 1, hh * d), "token_head": (tq * hh, d, tq * hh),
            "token": (tq, hh * d, tq)}[mode]


def _groups(x: Tensor, mode: str) -> Tensor:
    """x [L, Tq, H, D] -> [L, G, m] groups in the layout of _group_layout."""
    nl, tq, hh, d = x.shape
    if mode == "head":
        return x.permute(0, 2, 1, 3).reshape(nl, hh, tq * d)
    if mode == "channel":
        return x.reshape(nl, tq, hh * d).transpose(1, 2)
    if mode == "token_head":
        return x.reshape(nl, tq * hh, d)
    return x.reshape(nl, tq, hh * d)


@dataclass
class DeviceEncoded:
    """Everything a quant/lossless stream holds, still on the device."""
    num_segments: int
    n: int
    syms: Tensor            # [S, n] uint8
    freq: Tensor            # [S * num_tables, A] int32
    words: Tensor           # int16, all segments' words
    counts: Tensor          # [S * G] int64 words per group
    states: Tensor          # [S * G * 32] int64
    side: list[dict[str, Any]]  # per segment: scale_base (int tensor), scales, exact, esc idx / values


def _tables(counts: Tensor) -> Tensor:
    """Same rule as rans.normalize_counts, in torch."""
    counts = counts.to(torch.int64)
    a = counts.shape[1]
    total = counts.sum(1, keepdim=True).clamp(min=1)
    freq = counts * (rans.PROB_SCALE - a) // total + (counts > 0).to(torch.int64)
    rem = rans.PROB_SCALE - freq.sum(1)
    freq[torch.arange(freq.shape[0], device=freq.device), counts.argmax(1)] += rem
    return freq.to(torch.int32)


def encode_device(h: StreamHeader, kv: Tensor, first_layer: int = 0) -> DeviceEncoded:
    from kernels.codec_quantize import histogram, quantize
    from kernels.codec_rans import rans_encode

    cfg, m = h.level, h.model
    nl, two, t, hh, d = kv.shape
    if two != 2 or t != h.num_tokens or hh != m.num_kv_heads or d != m.head_dim:
        raise CodecError(f"kv shape {tuple(kv.shape)} does not match the header")
    side: list[dict[str, Any]] = [{} for _ in range(2 * nl)]
    if cfg.kind == "lossless":
        es = kv.element_size()
        n = t * hh * d
        syms = kv.reshape(nl * 2, n).view(torch.uint8).reshape(nl * 2, n, es).permute(0, 2, 1).reshape(nl * 2 * es, n)
        syms = syms.contiguous()
        a, nt, tdiv, tmod = 256, hh, d, hh
    elif cfg.kind == "quant" and cfg.stat == "meanabs":
        if not bool(torch.isfinite(kv).all()):
            raise CodecError(f"KV contains inf/NaN; lossy level {cfg.name!r} needs finite values")
        exact = exact_token_mask(h)
        q_idx = np.flatnonzero(~exact)
        lo, hi = (int(q_idx[0]), int(q_idx[-1]) + 1) if q_idx.size else (0, 0)
        tq = hi - lo
        n = tq * hh * d
        sym_parts = []
        bands = torch.tensor([cfg.band_multiplier(first_layer + i, m.num_layers) for i in range(nl)], dtype=torch.float64)
        for j, (alpha, mode) in enumerate(((cfg.alpha_k, cfg.k_scale), (cfg.alpha_v, cfg.v_scale))):
            xq = kv[:, j, lo:hi]                                   # [L, Tq, H, D] view
            codes = _meanabs_codes(_groups(xq.float().abs(), mode))  # [L, G]
            base = codes.amax(1, keepdim=True)
            rel = torch.clamp(base - codes, 0, 255)
            scale = _decode_codes(base - rel)
            al = (alpha * bands).to(torch.float32).to(kv.device)[:, None]   # fp32(alpha * band)
            step = al * scale
            step = torch.where(step > 0, step, torch.ones_like(step))
            inv = (1.0 / step).contiguous()
            g, gdiv, gmod = _group_layout(mode, tq, hh, d)
            sy = quantize(xq.reshape(nl, tq, hh * d), inv, gdiv, gmod, cfg.max_q)
            sym_parts.append(sy)
            for i in range(nl):
                side[2 * i + j] = {"scale_base": base[i, 0], "scales": rel[i].to(torch.uint8), "lo": lo, "hi": hi,
                                   "step": step[i]}
        syms = torch.stack(sym_parts, 1).reshape(nl * 2, n)
        a = cfg.alphabet
        nt, tdiv, tmod = (hh, d, hh) if cfg.table == "head" else (hh * d, 1, hh * d)
    else:
        raise CodecError(f"level {cfg.name!r} has no GPU path (kind {cfg.kind}, stat {cfg.stat})")
    counts = histogram(syms, nt, tdiv, tmod, a)
    freq = _tables(counts)
    cum = (torch.cumsum(freq, 1) - freq).to(torch.int32)
    words, gcounts, states = rans_encode(syms, freq, cum.contiguous(), nt, tdiv, tmod, cfg.lane_len)
    return DeviceEncoded(syms.shape[0], n, syms, freq, words, gcounts, states, side)


def payloads(h: StreamHeader, kv: Tensor, enc: DeviceEncoded, first_layer: int = 0) -> list[dict[str, Any]]:
    """Host copy of a DeviceEncoded into the same payload maps the CPU reference writes."""
    cfg, m = h.level, h.model
    nl = kv.shape[0]
    hh, d = m.num_kv_heads, m.head_dim
    nt = hh * d if cfg.table == "channel_cdf16" else hh
    num_groups = rans.plan_lanes(enc.n, cfg.lane_len)[0]
    freq = enc.freq.cpu().numpy().astype(np.uint32)
    counts = enc.counts.cpu().numpy()
    states = enc.states.cpu().numpy().astype(np.uint32)
    words = enc.words.cpu().numpy().view(np.uint16)
    offs = np.concatenate([[0], np.cumsum(counts)])
    segs = []
    for s in range(enc.num_segments):
        f = freq[s * nt:(s + 1) * nt]
        tb = rans.cdf16_to_bytes(f) if cfg.table == "channel_cdf16" else rans.table_to_bytes(f)
        g0, g1 = s * num_groups, (s + 1) * num_groups
        nbytes = 4 * num_groups + 4 * 32 * num_groups + 2 * int(counts[g0:g1].sum())
        if nbytes + len(tb) >= enc.n:
            segs.append({"stored": enc.syms[s].cpu().numpy().tobytes()})
        else:
            segs.append({"tables": tb, "rans": [counts[g0:g1].astype("<u4").tobytes(),
                                                states[g0 * 32:g1 * 32].astype("<u4").tobytes(),
                                                words[offs[g0]:offs[g1]].astype("<u2").tobytes()]})
    out = []
    if cfg.kind == "lossless":
        es = kv.element_size()
        for i in range(nl):
            out.append({"layer": first_layer + i, "k": {"planes": segs[2 * i * es:(2 * i + 1) * es]},
                        "v": {"planes": segs[(2 * i + 1) * es:(2 * i + 2) * es]}})
        return out
    exact = torch.from_numpy(exact_token_mask(h))
    esc_sym = 2 * cfg.max_q + 1
    for i in range(nl):
        secs = []
        for j in range(2):
            sd = enc.side[2 * i + j]
            x = kv[i, j].cpu()
            ints = x.contiguous().view(INT_VIEW[x.dtype]).numpy()
            sec: dict[str, Any] = {"exact": ints[exact.numpy()].tobytes()}
            if enc.n:
                sy = enc.syms[2 * i + j]
                idx = torch.nonzero(sy == esc_sym).flatten().cpu().numpy()
                sec.update({"scale_base": int(sd["scale_base"]), "scales": sd["scales"].cpu().numpy().tobytes(),
                            "esc_idx": idx.astype("<u4").tobytes(),
                            "esc_val": ints[sd["lo"]:sd["hi"]].reshape(-1)[idx].tobytes(), "seg": segs[2 * i + j]})
            secs.append(sec)
        out.append({"layer": first_layer + i, "k": secs[0], "v": secs[1]})
    return out


def decode_device(h: StreamHeader, enc: DeviceEncoded, steps: Tensor | None = None) -> Tensor:
    """Device-side decode of a DeviceEncoded's coded symbols -> [S, n] uint8 (for speed and
    identity checks); raises CodecError if any lane does not end cleanly."""
    from kernels.codec_rans import rans_decode
    cfg, m = h.level, h.model
    hh, d = m.num_kv_heads, m.head_dim
    if cfg.kind == "lossless":
        nt, tdiv, tmod = hh, d, hh
    else:
        nt, tdiv, tmod = (hh, d, hh) if cfg.table == "head" else (hh * d, 1, hh * d)
    cum = (torch.cumsum(enc.freq, 1) - enc.freq).to(torch.int32).contiguous()
    syms, fin_x, fin_p, stop = rans_decode(enc.words, enc.counts, enc.states, enc.freq, cum, enc.num_segments,
                                           enc.n, nt, tdiv, tmod, cfg.lane_len)
    if not bool((fin_x == rans.RANS_L).all()) or not bool((fin_p == stop).all()):
        raise CodecError("GPU rANS decode did not end cleanly (corrupt stream)")
    return syms


def decode_full(h: StreamHeader, enc: DeviceEncoded, dtype: torch.dtype) -> Tensor:
    """rANS decode + lane check + dequantize, on the device: [S, n] values (escapes and exact
    tokens are scattered in afterwards by the caller; they are a tiny fraction)."""
    from kernels.codec_quantize import dequantize
    syms = decode_device(h, enc)
    cfg = h.level
    if cfg.kind != "quant" or not enc.n:
        return syms
    m = h.model
    tq = enc.n // (m.num_kv_heads * m.head_dim)
    outs = []
    for j, mode in enumerate((cfg.k_scale, cfg.v_scale)):
        g, gdiv, gmod = _group_layout(mode, tq, m.num_kv_heads, m.head_dim)
        steps = torch.stack([enc.side[s]["step"] for s in range(j, enc.num_segments, 2)])
        outs.append(dequantize(syms[j::2].contiguous(), steps, gdiv, gmod, cfg.max_q, dtype))
    return torch.stack(outs, 1)
