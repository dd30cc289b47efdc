"""Decode received layer sections on the device: section bytes -> K/V tensors where the decode
instance computes, bit-exact to the CPU reference (layer_codec._decode_quant / _decode_lossless).

    parse (CPU, msgpack + CRC32 done by format.parse_section)
      -> checks and packing into one host buffer (pinned on CUDA)   words, counts, states,
                                                                     frequencies, scale codes, exact
                                                                     tokens, escapes
      -> one non-blocking upload
      -> tables + LUT                                                 1 launch
      -> rANS decode fused with dequantize (quant)                    1 launch
         (symbols + dequantize when some segment was stored raw)
      -> escapes and exact tokens scattered in                        a few small copies
      -> one sync: lane ends and escape slots checked -> CodecError

The caller picks the stream (the receiver decodes on a side stream); everything here runs on
the current stream, and the final check synchronizes it, so returned tensors are ready.
Levels without a device path (gpu.supports: zstd, CacheGen's per-channel CDFs) are not handled
here; KVDecoder decodes those on the CPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvtransfer.codec import entropy
from kvtransfer.codec.errors import CodecError
from kvtransfer.codec.format import INT_VIEW, StreamHeader, field_bytes, field_int
from kvtransfer.codec.gpu import _group_layout, _quant_range, supports
from kvtransfer.codec.rans import RANS_L, plan_lanes

Tensor = torch.Tensor
LayerKV = tuple[int, Tensor, Tensor]
_ALIGN = 16


class _HostPack:
    """Many small host arrays -> one upload; each comes back as a typed device view."""

    def __init__(self) -> None:
        self.parts: list[tuple[int, np.ndarray]] = []
        self.size = 0

    def add(self, a: np.ndarray) -> int:
        a = np.ascontiguousarray(a)
        self.parts.append((self.size, a))
        self.size += -(-max(a.nbytes, 1) // _ALIGN) * _ALIGN
        return len(self.parts) - 1

    def upload(self, device: torch.device) -> list[Tensor]:
        pinned = device.type == "cuda"
        host = torch.empty(max(self.size, _ALIGN), dtype=torch.uint8, pin_memory=pinned)
        buf = host.numpy()
        for off, a in self.parts:
            buf[off:off + a.nbytes] = a.reshape(-1).view(np.uint8)
        dev = host.to(device, non_blocking=pinned)
        return [dev[off:off + a.nbytes].view(_TORCH[a.dtype.str[1:]]).view(a.shape) for off, a in self.parts]


_TORCH = {"u1": torch.uint8, "i2": torch.int16, "u2": torch.int16, "i4": torch.int32, "u4": torch.int32,
          "f4": torch.float32, "i8": torch.int64}


def _coded_segments(maps: list[Any], n: int, num_tables: int, alphabet: int, lane_len: int, what: str,
                    pack: _HostPack) -> tuple[list[int], dict[int, int], dict[str, int] | None]:
    """Check the segment maps and queue their arrays for upload.
    -> (coded segment ids, {stored segment id: pack index}, pack indices of the coded arrays)."""
    num_groups, num_lanes, _ = plan_lanes(n, lane_len)
    coded: list[int] = []
    stored: dict[int, int] = {}
    words, counts, states, freqs = [], [], [], []
    for s, m in enumerate(maps):
        if not isinstance(m, dict):
            raise CodecError(f"{what}: segment {s} is not a map")
        if "stored" in m:
            raw = m["stored"]
            if not isinstance(raw, bytes) or len(raw) != n:
                raise CodecError(f"{what}: stored segment {s} has {len(raw) if isinstance(raw, bytes) else '?'} "
                                 f"bytes, expected {n}")
            stored[s] = pack.add(np.frombuffer(raw, np.uint8))
            continue
        parts = m.get("rans")
        if not isinstance(m.get("tables"), bytes) or not isinstance(parts, list) or len(parts) != 3 \
                or not all(isinstance(p, bytes) for p in parts):
            raise CodecError(f"{what}: segment {s} needs 'tables' bytes and 'rans' [counts, states, words]")
        if len(parts[0]) % 4 or len(parts[1]) % 4 or len(parts[2]) % 2:
            raise CodecError(f"{what}: segment {s} rANS arrays have ragged byte lengths")
        c, st, w = np.frombuffer(parts[0], "<u4"), np.frombuffer(parts[1], "<u4"), np.frombuffer(parts[2], "<u2")
        if c.size != num_groups or st.size != num_lanes:
            raise CodecError(f"{what}: rANS segment: expected {num_groups} group counts and {num_lanes} lane "
                             f"states, found {c.size} and {st.size}")
        if int(c.astype(np.int64).sum()) != w.size:
            raise CodecError(f"{what}: rANS segment: group word counts do not add up to the words present")
        if np.any(st < RANS_L):
            raise CodecError(f"{what}: rANS segment: a lane state is below 2^16 (corrupt stream)")
        freqs.append(entropy._tables_parse(m["tables"], num_tables, alphabet, "head"))
        words.append(w)
        counts.append(c)
        states.append(st)
        coded.append(s)
    if not coded:
        return coded, stored, None
    w = np.concatenate(words) if sum(x.size for x in words) else np.zeros(1, np.uint16)
    return coded, stored, {"words": pack.add(w.view(np.int16)),
                           "counts": pack.add(np.concatenate(counts).view(np.int32)),
                           "states": pack.add(np.concatenate(states).view(np.int32)),
                           "freq": pack.add(np.concatenate(freqs).astype(np.int32))}


def _decode_symbols(h: StreamHeader, n: int, coded: list[int], stored: dict[int, int], idx: dict[str, int] | None,
                    dev: list[Tensor], num_segments: int, flags: list[Tensor]) -> Tensor:
    """[S, n] uint8 symbols: coded segments by the rANS kernel, stored ones as uploaded."""
    from kernels.codec_rans import build_tables, rans_decode
    hh, d = h.model.num_kv_heads, h.model.head_dim
    syms = torch.empty((num_segments, n), dtype=torch.uint8, device=dev[0].device)
    if idx is not None:
        tables = build_tables(dev[idx["freq"]], from_counts=False, want_lut=True)
        got, flag = rans_decode(dev[idx["words"]], dev[idx["counts"]], dev[idx["states"]], tables, len(coded), n,
                                hh, d, hh, h.level.lane_len)
        flags.append(flag[0])
        if len(coded) == num_segments:
            return got
        syms[torch.tensor(coded, device=syms.device)] = got
    for s, j in stored.items():
        syms[s] = dev[j]
    return syms


def _steps(codes: Tensor, alphas: Tensor) -> Tensor:
    """Scale codes int32 [S, G] -> fp32 steps, bit for bit quant.decode_codes + steps_from_scales:
    the scale 2^(code >> 3) * (1 + (code % 8 + 0.5) / 8) is built from its bits (as the encoder's
    kernel does), then one fp32 multiply by fp32(alpha * band); a zero step becomes 1."""
    e = torch.clamp(codes >> 3, -100, 100)
    scale = (((e + 127) << 23) | ((1 + 2 * (codes & 7)) << 19)).view(torch.float32)
    step = alphas * scale
    return torch.where(step > 0, step, torch.ones_like(step))


def _finish(flags: list[Tensor], what: str) -> None:
    """The one host sync: raise if a lane did not end cleanly or an escape slot disagrees."""
    if flags and int(torch.stack([f.reshape(()) for f in flags]).amax().item()):
        raise CodecError(f"{what}: device decode found a corrupt stream (a rANS lane did not end cleanly, "
                         "or escapes do not match the escape symbols)")


def decode_lossless(h: StreamHeader, payloads: list[dict[str, Any]], device: torch.device) -> list[LayerKV]:
    m = h.model
    dt = m.torch_dtype
    es = dt.itemsize
    t, hh, d = h.num_tokens, m.num_kv_heads, m.head_dim
    n = t * hh * d
    maps = []
    for p in payloads:
        for name in ("k", "v"):
            pl = p[name].get("planes")
            if not isinstance(pl, list) or len(pl) != es:
                raise CodecError(f"layer {p['layer']} {name.upper()}: expected {es} byte planes")
            maps.extend(pl)
    pack = _HostPack()
    coded, stored, idx = _coded_segments(maps, n, hh, 256, h.level.lane_len, "lossless", pack)
    dev = pack.upload(device)
    flags: list[Tensor] = []
    syms = _decode_symbols(h, n, coded, stored, idx, dev, len(maps), flags)
    _finish(flags, "lossless")
    # planes [L, 2, es, n] (byte b of each little-endian element) -> elements [L, 2, T, H, D]
    ints = syms.view(len(payloads), 2, es, n).transpose(2, 3).contiguous().view(dt).view(len(payloads), 2, t, hh, d)
    return [(p["layer"], ints[j, 0], ints[j, 1]) for j, p in enumerate(payloads)]


def decode_quant(h: StreamHeader, payloads: list[dict[str, Any]], device: torch.device) -> list[LayerKV]:
    from kernels.codec_symbols import dequantize
    from kernels.codec_rans import build_tables, rans_decode
    m, cfg = h.model, h.level
    dt = m.torch_dtype
    es = dt.itemsize
    idv = np.dtype(str(INT_VIEW[dt]).replace("torch.", ""))
    t, hh, d = h.num_tokens, m.num_kv_heads, m.head_dim
    nl, s_count = len(payloads), 2 * len(payloads)
    lo, hi = _quant_range(h)
    tq = hi - lo
    te = t - tq
    n = tq * hh * d
    modes = (cfg.k_scale, cfg.v_scale)
    gmax = max(_group_layout(mode, tq, hh, d)[0] for mode in modes) if tq else 1
    pack = _HostPack()
    exact = np.empty((s_count, te * hh * d), dtype=idv)
    codes = np.zeros((s_count, gmax), dtype=np.int32)        # 1/8-octave log scale codes per group
    alphas = np.ones((s_count, 1), dtype=np.float32)        # fp32(alpha * band), as quant.steps_from_scales
    esc_idx, esc_val, maps = [], [], []
    for j, p in enumerate(payloads):
        band = cfg.band_multiplier(p["layer"], m.num_layers)
        for k, (name, alpha, mode) in enumerate((("k", cfg.alpha_k, cfg.k_scale), ("v", cfg.alpha_v, cfg.v_scale))):
            what, sec, s = f"layer {p['layer']} {name.upper()}", p[name], 2 * j + k
            exact[s] = np.frombuffer(field_bytes(sec, "exact", what, te * hh * d * es), idv)
            if not tq:
                continue
            num_g = _group_layout(mode, tq, hh, d)[0]
            rel = np.frombuffer(field_bytes(sec, "scales", what, num_g), np.uint8)
            codes[s, :num_g] = field_int(sec, "scale_base", what) - rel.astype(np.int32)
            alphas[s] = np.float32(alpha * band)
            idx_raw, val_raw = field_bytes(sec, "esc_idx", what), field_bytes(sec, "esc_val", what)
            if len(idx_raw) % 4 or len(val_raw) != len(idx_raw) // 4 * es:
                raise CodecError(f"{what}: escape indices and values disagree in count")
            idx = np.frombuffer(idx_raw, "<u4").astype(np.int64)
            if idx.size and idx.max() >= n:
                raise CodecError(f"{what}: escape list does not match the escape symbols (corrupt stream)")
            if idx.size > 1 and not bool(np.all(idx[1:] > idx[:-1])):   # encoders write them in order
                raise CodecError(f"{what}: escape list is not strictly increasing (corrupt stream)")
            esc_idx.append(idx + s * n)
            esc_val.append(np.frombuffer(val_raw, idv))
            if "seg" not in sec:
                raise CodecError(f"{what}: missing coded symbols")
            maps.append(sec["seg"])
    i_exact = pack.add(exact)
    flags: list[Tensor] = []
    if tq:
        i_codes, i_alphas = pack.add(codes), pack.add(alphas)
        gidx = np.concatenate(esc_idx)
        i_eidx, i_eval = pack.add(gidx), pack.add(np.concatenate(esc_val))
        i_ecount = pack.add(np.array([a.size for a in esc_idx], dtype=np.int32))
        coded, stored, idx = _coded_segments(maps, n, hh, cfg.alphabet, cfg.lane_len, "quant", pack)
    dev = pack.upload(device)
    out = torch.empty((nl, 2, t, hh, d), dtype=dt, device=device)
    ints = out.view(INT_VIEW[dt])
    if tq:
        step = _steps(dev[i_codes], dev[i_alphas])
        if len(coded) == s_count:   # the usual case: decode fused with dequantize
            ks, vs = (_group_layout(mode, tq, hh, d)[1:] for mode in modes)
            values = {"step": step, "k": (ks[0], 0 if cfg.k_scale == "token_head" else ks[1]),
                      "v": (vs[0], 0 if cfg.v_scale == "token_head" else vs[1]), "max_q": cfg.max_q, "dtype": dt}
            tables = build_tables(dev[idx["freq"]], from_counts=False, want_lut=True)
            vals, flag = rans_decode(dev[idx["words"]], dev[idx["counts"]], dev[idx["states"]], tables, s_count, n,
                                     hh, d, hh, cfg.lane_len, values=values)
            flags.append(flag[0])
            flags.append((flag[1:] != dev[i_ecount]).any().to(torch.int32))    # escapes per segment
        else:                       # some segment was stored raw: symbols, then dequantize per K/V
            syms = _decode_symbols(h, n, coded, stored, idx, dev, s_count, flags)
            vals = torch.empty((s_count, n), dtype=dt, device=device)
            for k, mode in enumerate(modes):
                _, gdiv, gmod = _group_layout(mode, tq, hh, d)
                vals[k::2] = dequantize(syms[k::2].contiguous(), step[k::2].contiguous(), gdiv, gmod,
                                        cfg.max_q, dt)
            esc = syms == 2 * cfg.max_q + 1
            bad = esc.sum() != int(gidx.size)
            if gidx.size:
                bad = bad | ~esc.view(-1)[dev[i_eidx]].all()
            flags.append(bad.to(torch.int32))
        vflat = vals.view(INT_VIEW[dt]).view(-1)
        if gidx.size:
            at = dev[i_eidx]
            if len(coded) == s_count:   # escape slots came out NaN: the list must name exactly those
                flags.append((~torch.isnan(vals.view(-1)[at])).any().to(torch.int32))
            vflat[at] = dev[i_eval]
        if te:
            ints[:, :, lo:hi] = vflat.view(nl, 2, tq, hh, d)
        else:
            out = vals.view(nl, 2, t, hh, d)
            ints = out.view(INT_VIEW[dt])
    if te:
        ex = dev[i_exact].view(nl, 2, te, hh, d)
        ints[:, :, :lo] = ex[:, :, :lo]
        ints[:, :, hi:] = ex[:, :, lo:]
    _finish(flags, "quant")
    return [(p["layer"], out[j, 0], out[j, 1]) for j, p in enumerate(payloads)]


def decode_payloads(h: StreamHeader, payloads: list[dict[str, Any]], device: torch.device) -> list[LayerKV]:
    """Parsed layer payloads -> [(layer, K, V)] on `device`, [num_tokens, num_kv_heads, head_dim] each."""
    if not supports(h.level):
        raise CodecError(f"level {h.level.name!r} has no device decoder")
    for p in payloads:
        for name in ("k", "v"):
            if not isinstance(p[name], dict):
                raise CodecError(f"layer {p['layer']} {name.upper()}: section is not a map")
    if h.level.kind == "lossless":
        return decode_lossless(h, payloads, device)
    return decode_quant(h, payloads, device)

