"""GPU encoder/decoder for the `quant` (meanabs scales, per-head tables) and `lossless` kinds:
the Triton kernels in kernels/codec_*.py, every layer of a request in the same few launches, no
host sync until the caller copies bytes out. Produces byte-identical layer sections to the CPU
reference (tests/kernels/test_codec_kernels.py checks it).

Input is the transfer layer's gather output for one token range:
    kv: [num_layers, 2, num_tokens, num_kv_heads, head_dim] on the device (K at 0, V at 1)
Encode launches (quant): memset, stats (1, or 2 with per-head/per-channel key scales),
quantize + histogram, tables, rANS encode, compaction.
`encode_device` stops at device buffers (what the speed benchmark times); `payloads` copies
them to the host (the one sync; it also raises the inf/NaN error found on the device) and
builds the msgpack-ready layer payloads. `decode_full` decodes a DeviceEncoded on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvtransfer.codec import rans
from kvtransfer.codec.errors import CodecError
from kvtransfer.codec.format import INT_VIEW, StreamHeader
from kvtransfer.codec.layer_codec import exact_token_mask
from kvtransfer.codec.levels import LevelConfig

Tensor = torch.Tensor

_MODES = {"head": 0, "channel": 1, "token_head": 2}


def supports(cfg: LevelConfig) -> bool:
    """Whether `cfg` has a GPU path (else the CPU reference codes it)."""
    if cfg.kind == "lossless":
        return True
    return (cfg.kind == "quant" and cfg.stat == "meanabs" and cfg.table == "head"
            and cfg.k_scale in _MODES and cfg.v_scale in _MODES)


def on_device(x: Tensor) -> bool:
    """Whether a tensor lives where the kernels run."""
    return x.is_cuda


def decodes_on(device: torch.device) -> bool:
    """Whether a decoder for `device` runs the kernels (tests patch this to run them interpreted on CPU)."""
    return device.type == "cuda"


def _group_layout(mode: str, tq: int, hh: int, d: int) -> tuple[int, int, int]:
    """(num_groups, gdiv, gmod) of a scale mode over a flat [Tq, H, D] segment."""
    return {"head": (hh, d, hh), "channel": (hh * d, 1, hh * d), "token_head": (tq * hh, d, tq * hh)}[mode]


@dataclass
class DeviceEncoded:
    """Everything a quant/lossless stream holds, still on the device."""
    num_segments: int
    n: int
    lo: int                 # quantized tokens [lo, hi) of the chunk (quant), 0..T (lossless)
    hi: int
    syms: Tensor            # [S, n] uint8
    freq: Tensor            # [S * num_tables, A] int32
    words: Tensor           # int16, all segments' words (first `total` are valid)
    total: Tensor           # [1] int32 words in use
    counts: Tensor          # [S * G] int32 words per group
    states: Tensor          # [S * G * 32] int32 (uint32 bits)
    rel: Tensor | None      # [S, GMAX] uint8 scale offsets below the segment's base code
    base: Tensor | None     # [S] int32 base code + CODE_OFFSET
    step: Tensor | None     # [S, GMAX] fp32 steps (for decode_full)
    flag: Tensor | None     # [1] int32: 1 when the input held inf/NaN


_ALPHA_CACHE: dict[tuple[Any, ...], Tensor] = {}


def _alpha_band(cfg: LevelConfig, num_layers: int, layer_ids: Sequence[int], device: torch.device) -> Tensor:
    """fp32(alpha * band multiplier) per segment, cached so a call does not wait on a copy."""
    key = (cfg, num_layers, tuple(layer_ids), str(device))
    t = _ALPHA_CACHE.get(key)
    if t is None:
        vals = [a * cfg.band_multiplier(i, num_layers) for i in layer_ids for a in (cfg.alpha_k, cfg.alpha_v)]
        t = torch.tensor(vals, dtype=torch.float64).to(torch.float32).to(device)
        if len(_ALPHA_CACHE) > 256:
            _ALPHA_CACHE.clear()
        _ALPHA_CACHE[key] = t
    return t


def _quant_range(h: StreamHeader) -> tuple[int, int]:
    q_idx = np.flatnonzero(~exact_token_mask(h))
    return (int(q_idx[0]), int(q_idx[-1]) + 1) if q_idx.size else (0, 0)


def encode_device(h: StreamHeader, kv: Tensor, first_layer: int = 0,
                  layer_ids: Sequence[int] | None = None, gpp: int | None = None) -> DeviceEncoded:
    from kernels.codec_quantize import Workspace, quantize_histogram, scale_stats
    from kernels.codec_rans import build_tables, rans_encode
    from kernels.codec_symbols import histogram

    cfg, m = h.level, h.model
    nl, two, t, hh, d = kv.shape
    if two != 2 or t != h.num_tokens or hh != m.num_kv_heads or d != m.head_dim:
        raise CodecError(f"kv shape {tuple(kv.shape)} does not match the header")
    if not supports(cfg):
        raise CodecError(f"level {cfg.name!r} has no GPU path (kind {cfg.kind}, stat {cfg.stat}, table {cfg.table})")
    layer_ids = list(range(first_layer, first_layer + nl)) if layer_ids is None else list(layer_ids)
    kv = kv.contiguous()
    rel = base = step = flag = None
    if cfg.kind == "lossless":
        es = kv.element_size()
        n = t * hh * d
        syms = kv.reshape(nl * 2, n).view(torch.uint8).reshape(nl * 2, n, es).permute(0, 2, 1).reshape(nl * 2 * es, n)
        syms = syms.contiguous()
        lo, hi = 0, t
        counts = histogram(syms, hh, d, hh, 256)
    else:
        lo, hi = _quant_range(h)
        tq = hi - lo
        gmax = max(_group_layout(mode, tq, hh, d)[0] for mode in (cfg.k_scale, cfg.v_scale))
        ws = Workspace(2 * nl, max(gmax, 1), hh, cfg.alphabet, kv.device)
        k_mode, v_mode = _MODES[cfg.k_scale], _MODES[cfg.v_scale]
        scale_stats(kv, lo, hi, k_mode, v_mode, ws)
        syms = quantize_histogram(kv, lo, hi, _alpha_band(cfg, m.num_layers, layer_ids, kv.device), k_mode, v_mode,
                                  cfg.max_q, ws)
        n = syms.shape[1]
        counts, rel, base, step, flag = ws.counts, ws.rel, ws.base, ws.step, ws.flag
    if not n:
        z = torch.zeros(1, dtype=torch.int32, device=kv.device)
        return DeviceEncoded(syms.shape[0], 0, lo, hi, syms, counts, z, z, z, z, rel, base, step, flag)
    tables = build_tables(counts)
    words, gcounts, total, states = rans_encode(syms, tables, hh, d, hh, cfg.lane_len, gpp=gpp)
    return DeviceEncoded(syms.shape[0], n, lo, hi, syms, tables.freq, words, total, gcounts, states, rel, base,
                         step, flag)


def _check_finite(h: StreamHeader, enc: DeviceEncoded) -> None:
    if enc.flag is not None and int(enc.flag.item()):
        raise CodecError(f"KV contains inf/NaN; lossy level {h.level.name!r} needs finite values "
                         f"(use 'lossless' or 'raw' to ship them bit-exact)")


def payloads(h: StreamHeader, kv: Tensor, enc: DeviceEncoded, first_layer: int = 0,
             layer_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Host copy of a DeviceEncoded into the same payload maps the CPU reference writes."""
    _check_finite(h, enc)
    cfg, m = h.level, h.model
    nl = kv.shape[0]
    layer_ids = list(range(first_layer, first_layer + nl)) if layer_ids is None else list(layer_ids)
    hh, d = m.num_kv_heads, m.head_dim
    segs: list[dict[str, Any]] = []
    if enc.n:
        num_groups = rans.plan_lanes(enc.n, cfg.lane_len)[0]
        freq = enc.freq.cpu().numpy().astype(np.uint32)
        counts = enc.counts.cpu().numpy().astype(np.int64)
        states = enc.states.cpu().numpy().view(np.uint32)
        words = enc.words[:int(counts.sum())].cpu().numpy().view(np.uint16)
        offs = np.concatenate([[0], np.cumsum(counts)])
        for s in range(enc.num_segments):
            tb = rans.table_to_bytes(freq[s * hh:(s + 1) * hh])
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
            out.append({"layer": layer_ids[i], "k": {"planes": segs[2 * i * es:(2 * i + 1) * es]},
                        "v": {"planes": segs[(2 * i + 1) * es:(2 * i + 2) * es]}})
        return out
    exact = torch.from_numpy(exact_token_mask(h))
    ints_dt = INT_VIEW[kv.dtype]
    kv_ints = kv.contiguous().view(ints_dt)
    exact_host = kv_ints[:, :, exact.to(kv.device)].cpu().numpy()        # [L, 2, Te, H, D]
    esc_sym = 2 * cfg.max_q + 1
    tq = enc.hi - enc.lo
    if enc.n:
        pos = torch.nonzero(enc.syms == esc_sym)                              # [M, 2] (segment, index)
        qv = kv_ints[:, :, enc.lo:enc.hi].reshape(2 * nl, enc.n)
        esc_vals = qv[pos[:, 0], pos[:, 1]].cpu().numpy()
        pos = pos.cpu().numpy()
        bounds = np.searchsorted(pos[:, 0], np.arange(2 * nl + 1))
        rel = enc.rel.cpu().numpy()
        base = enc.base.cpu().numpy().astype(np.int64) - 4096
    for i in range(nl):
        secs = []
        for j in range(2):
            s = 2 * i + j
            sec: dict[str, Any] = {"exact": exact_host[i, j].tobytes()}
            if enc.n:
                g = _group_layout(cfg.k_scale if j == 0 else cfg.v_scale, tq, hh, d)[0]
                idx = pos[bounds[s]:bounds[s + 1], 1]
                sec.update({"scale_base": int(base[s]), "scales": rel[s, :g].tobytes(),
                            "esc_idx": idx.astype("<u4").tobytes(),
                            "esc_val": esc_vals[bounds[s]:bounds[s + 1]].tobytes(), "seg": segs[s]})
            secs.append(sec)
        out.append({"layer": layer_ids[i], "k": secs[0], "v": secs[1]})
    return out


def _dec_tables(h: StreamHeader, enc: DeviceEncoded) -> Any:
    from kernels.codec_rans import build_tables
    return build_tables(enc.freq, from_counts=False, want_lut=True)


def decode_device(h: StreamHeader, enc: DeviceEncoded) -> Tensor:
    """Device-side decode of a DeviceEncoded's coded symbols -> [S, n] uint8 (for speed and
    identity checks); raises CodecError if any lane does not end cleanly."""
    from kernels.codec_rans import rans_decode
    m = h.model
    hh, d = m.num_kv_heads, m.head_dim
    if not enc.n:
        return enc.syms
    syms, flag = rans_decode(enc.words, enc.counts, enc.states, _dec_tables(h, enc), enc.num_segments, enc.n,
                             hh, d, hh, h.level.lane_len)
    if int(flag.item()):
        raise CodecError("GPU rANS decode did not end cleanly (corrupt stream)")
    return syms


def decode_full(h: StreamHeader, enc: DeviceEncoded, dtype: torch.dtype, gather: bool = True,
                gpp: int | None = None) -> Tensor:
    """rANS decode + lane check + dequantize, on the device, in one decode launch: [S, n] values
    (escape slots come out NaN; they and the exact tokens are scattered in by the caller, a tiny
    fraction). Syncs once, at the end, to raise on a lane that did not end cleanly."""
    from kernels.codec_rans import rans_decode
    cfg, m = h.level, h.model
    hh, d = m.num_kv_heads, m.head_dim
    if cfg.kind != "quant":
        return decode_device(h, enc)
    if not enc.n:
        return enc.syms.to(dtype)
    tq = enc.hi - enc.lo
    # (gdiv, gmod) as compile-time divisors; a per-token-and-head group needs no wrap (gmod 0)
    ks, vs = (_group_layout(mode, tq, hh, d)[1:] for mode in (cfg.k_scale, cfg.v_scale))
    values = {"step": enc.step, "k": (ks[0], 0 if cfg.k_scale == "token_head" else ks[1]),
              "v": (vs[0], 0 if cfg.v_scale == "token_head" else vs[1]), "max_q": cfg.max_q, "dtype": dtype}
    vals, flag = rans_decode(enc.words, enc.counts, enc.states, _dec_tables(h, enc), enc.num_segments, enc.n,
                             hh, d, hh, cfg.lane_len, values=values, gather=gather, gpp=gpp)
    if int(flag[0].item()):
        raise CodecError("GPU rANS decode did not end cleanly (corrupt stream)")
    return vals
