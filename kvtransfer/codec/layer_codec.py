"""Per-kind coding of layers' K and V tensors ([num_tokens, num_kv_heads, head_dim]).

Each kind encodes a batch of layers at once (one vectorized rANS pass on CPU) but writes
each layer's payload so that it decodes alone. Kinds are looked up in `LAYER_CODECS`.

Quant tensor section:
    exact    raw dtype bytes of the exact tokens (sinks, most recent), token order
    scale_base / scales   meanabs: int base + uint8 offsets per group; absmax: fp16 per group
    esc_idx / esc_val     u32 flat indices into the quantized tokens, raw dtype bits
    seg      entropy-coded symbols (see entropy.py)
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from kvtransfer.codec import entropy, quant
from kvtransfer.codec.errors import CodecError
from kvtransfer.codec.format import INT_VIEW, StreamHeader, field_bytes, field_int

Tensor = torch.Tensor
LayerKV = tuple[int, Tensor, Tensor]


def _np_int(x: Tensor) -> np.ndarray:
    return x.contiguous().view(INT_VIEW[x.dtype]).numpy()


def _from_np_int(a: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).view(dtype).reshape(shape)


def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---- raw / zstd -------------------------------------------------------------------------------

def _encode_raw(h: StreamHeader, items: list[LayerKV]) -> list[dict[str, Any]]:
    return [{"layer": i, "k": {"raw": _np_int(k).tobytes()}, "v": {"raw": _np_int(v).tobytes()}}
            for i, k, v in items]


def _decode_raw(h: StreamHeader, payloads: list[dict[str, Any]]) -> list[LayerKV]:
    shape = (h.num_tokens, h.model.num_kv_heads, h.model.head_dim)
    dt = h.model.torch_dtype
    size = int(np.prod(shape)) * _esize(dt)
    idv = np.dtype(str(INT_VIEW[dt]).replace("torch.", ""))
    out = []
    for p in payloads:
        kv = [_from_np_int(np.frombuffer(field_bytes(p[n], "raw", f"layer {p['layer']} {n.upper()}", size), idv).copy(),
                           dt, shape) for n in ("k", "v")]
        out.append((p["layer"], kv[0], kv[1]))
    return out


def _encode_zstd(h: StreamHeader, items: list[LayerKV]) -> list[dict[str, Any]]:
    import zstandard
    c = zstandard.ZstdCompressor(level=3)
    return [{"layer": i, "k": {"raw": c.compress(_np_int(k).tobytes())}, "v": {"raw": c.compress(_np_int(v).tobytes())}}
            for i, k, v in items]


def _decode_zstd(h: StreamHeader, payloads: list[dict[str, Any]]) -> list[LayerKV]:
    import zstandard
    d = zstandard.ZstdDecompressor()
    plain = []
    for p in payloads:
        q = dict(p)
        for n in ("k", "v"):
            try:
                q[n] = {"raw": d.decompress(field_bytes(p[n], "raw", f"layer {p['layer']} {n.upper()}"))}
            except zstandard.ZstdError as exc:
                raise CodecError(f"layer {p['layer']} {n.upper()}: zstd frame invalid ({exc})") from None
        plain.append(q)
    return _decode_raw(h, plain)


# ---- lossless: byte planes, entropy-coded -------------------------------------------------------

def _encode_lossless(h: StreamHeader, items: list[LayerKV]) -> list[dict[str, Any]]:
    m, cfg = h.model, h.level
    es = _esize(m.torch_dtype)
    n = h.num_tokens * m.num_kv_heads * m.head_dim
    planes = []
    for _, k, v in items:
        for x in (k, v):
            planes.append(_np_int(x).reshape(-1).view(np.uint8).reshape(n, es).T)
    syms = np.ascontiguousarray(np.concatenate(planes, 0))  # [layers * 2 * es, n]
    tabs, nt = entropy.table_ids(n, m.num_kv_heads, m.head_dim, "head")
    segs = entropy.encode(syms, tabs, nt, 256, cfg.lane_len, "head")
    out = []
    for j, (i, _, _) in enumerate(items):
        base = j * 2 * es
        out.append({"layer": i, "k": {"planes": segs[base:base + es]}, "v": {"planes": segs[base + es:base + 2 * es]}})
    return out


def _decode_lossless(h: StreamHeader, payloads: list[dict[str, Any]]) -> list[LayerKV]:
    m, cfg = h.model, h.level
    dt = m.torch_dtype
    es = _esize(dt)
    shape = (h.num_tokens, m.num_kv_heads, m.head_dim)
    n = int(np.prod(shape))
    maps = []
    for p in payloads:
        for name in ("k", "v"):
            pl = p[name].get("planes") if isinstance(p[name], dict) else None
            if not isinstance(pl, list) or len(pl) != es:
                raise CodecError(f"layer {p['layer']} {name.upper()}: expected {es} byte planes")
            maps.extend(pl)
    tabs, nt = entropy.table_ids(n, m.num_kv_heads, m.head_dim, "head")
    syms = entropy.decode(maps, n, tabs, nt, 256, cfg.lane_len, "head", "lossless")
    out = []
    idv = np.dtype(str(INT_VIEW[dt]).replace("torch.", ""))
    for j, p in enumerate(payloads):
        kv = []
        for t in range(2):
            planes = syms[(2 * j + t) * es:(2 * j + t + 1) * es]
            ints = np.ascontiguousarray(planes.T).reshape(-1).view(idv)
            kv.append(_from_np_int(ints.copy(), dt, shape))
        out.append((p["layer"], kv[0], kv[1]))
    return out


# ---- quant ----------------------------------------------------------------------------------------

def exact_token_mask(h: StreamHeader) -> np.ndarray:
    """[num_tokens] bool: sink tokens and the request's most recent tokens are sent exact."""
    pos = np.arange(h.token_start, h.token_end)
    return (pos < h.level.num_sink) | (pos >= h.seq_len - h.level.num_recent)


def _groups(a: np.ndarray, mode: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    """[Tq, H, D] -> ([G, m] groups, broadcast shape of one scale per group)."""
    t, hh, d = a.shape
    if mode == "channel":
        return a.reshape(t, hh * d).T, (1, hh, d)
    if mode == "token_head":
        return a.reshape(t * hh, d), (t, hh, 1)
    if mode == "head":
        return a.transpose(1, 0, 2).reshape(hh, t * d), (1, hh, 1)
    return a.reshape(t, hh * d), (t, 1, 1)


def _scales(h: StreamHeader, xq: np.ndarray, mode: str) -> tuple[dict[str, Any], np.ndarray]:
    """Encoder side: scale side info and the fp32 scales, shaped to broadcast over [Tq, H, D]."""
    g, bshape = _groups(xq, mode)
    if h.level.stat == "absmax":
        s16 = quant.absmax_scales(g)
        return {"scales": s16.astype("<f2").tobytes()}, s16.astype(np.float32).reshape(bshape)
    base, rel = quant.pack_codes(quant.meanabs_codes(g))
    codes = quant.unpack_codes(base, np.frombuffer(rel, np.uint8))
    return {"scale_base": base, "scales": rel}, quant.decode_codes(codes).reshape(bshape)


def _group_shape(mode: str, t: int, hh: int, d: int) -> tuple[int, int, int]:
    """Broadcast shape of one scale per group over [t, H, D] (what _groups returns, no data)."""
    return {"channel": (1, hh, d), "token_head": (t, hh, 1), "head": (1, hh, 1)}.get(mode, (t, 1, 1))


def _scales_parse(h: StreamHeader, sec: dict[str, Any], tq: int, mode: str, what: str) -> np.ndarray:
    hh, d = h.model.num_kv_heads, h.model.head_dim
    bshape = _group_shape(mode, tq, hh, d)
    count = int(np.prod(bshape))
    if h.level.stat == "absmax":
        raw = field_bytes(sec, "scales", what, 2 * count)
        return np.frombuffer(raw, "<f2").astype(np.float32).reshape(bshape)
    base = field_int(sec, "scale_base", what)
    rel = np.frombuffer(field_bytes(sec, "scales", what, count), np.uint8)
    return quant.decode_codes(quant.unpack_codes(base, rel)).reshape(bshape)


def _check_finite(x: Tensor, layer: int, name: str, level: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise CodecError(f"layer {layer} {name} contains inf/NaN; lossy level {level!r} needs finite "
                         f"values (use 'lossless' or 'raw' to ship them bit-exact)")


def _encode_quant(h: StreamHeader, items: list[LayerKV]) -> list[dict[str, Any]]:
    m, cfg = h.model, h.level
    exact = exact_token_mask(h)
    tq = int((~exact).sum())
    n = tq * m.num_kv_heads * m.head_dim
    secs, syms = [], []
    for i, k, v in items:
        band = cfg.band_multiplier(i, m.num_layers)
        for name, x, alpha, mode in (("K", k, cfg.alpha_k, cfg.k_scale), ("V", v, cfg.alpha_v, cfg.v_scale)):
            _check_finite(x, i, name, cfg.name)
            ints = _np_int(x)
            sec: dict[str, Any] = {"exact": ints[exact].tobytes()}
            if tq:
                xq = x[torch.from_numpy(~exact)].float().numpy()
                side, scale = _scales(h, xq, mode)
                sec.update(side)
                _, inv = quant.steps_from_scales(scale, alpha * band)
                sym, esc = quant.quantize(xq, inv, cfg.max_q)
                idx = np.flatnonzero(esc.reshape(-1))
                sec["esc_idx"] = idx.astype("<u4").tobytes()
                sec["esc_val"] = ints[~exact].reshape(-1)[idx].tobytes()
                syms.append(sym.reshape(-1))
            secs.append(sec)
    if tq:
        tabs, nt = entropy.table_ids(n, m.num_kv_heads, m.head_dim, cfg.table)
        segs = entropy.encode(np.stack(syms), tabs, nt, cfg.alphabet, cfg.lane_len, cfg.table)
        for sec, seg in zip(secs, segs):
            sec["seg"] = seg
    return [{"layer": i, "k": secs[2 * j], "v": secs[2 * j + 1]} for j, (i, _, _) in enumerate(items)]


def _decode_quant(h: StreamHeader, payloads: list[dict[str, Any]]) -> list[LayerKV]:
    m, cfg = h.model, h.level
    dt = m.torch_dtype
    es = _esize(dt)
    hh, d = m.num_kv_heads, m.head_dim
    exact = exact_token_mask(h)
    te, tq = int(exact.sum()), int((~exact).sum())
    n = tq * hh * d
    idv = np.dtype(str(INT_VIEW[dt]).replace("torch.", ""))
    syms = None
    if tq:
        tabs, nt = entropy.table_ids(n, hh, d, cfg.table)
        maps = []
        for p in payloads:
            for name in ("k", "v"):
                if not isinstance(p[name], dict) or "seg" not in p[name]:
                    raise CodecError(f"layer {p['layer']} {name.upper()}: missing coded symbols")
                maps.append(p[name]["seg"])
        syms = entropy.decode(maps, n, tabs, nt, cfg.alphabet, cfg.lane_len, cfg.table, "quant")
    out = []
    for j, p in enumerate(payloads):
        i = p["layer"]
        band = cfg.band_multiplier(i, m.num_layers)
        kv = []
        for t, (name, alpha, mode) in enumerate((("k", cfg.alpha_k, cfg.k_scale), ("v", cfg.alpha_v, cfg.v_scale))):
            what = f"layer {i} {name.upper()}"
            sec = p[name]
            full = np.zeros((h.num_tokens, hh, d), dtype=idv)
            full[exact] = np.frombuffer(field_bytes(sec, "exact", what, te * hh * d * es), idv).reshape(te, hh, d)
            if tq:
                scale = _scales_parse(h, sec, tq, mode, what)
                step, _ = quant.steps_from_scales(scale, alpha * band)
                s = syms[2 * j + t].reshape(tq, hh, d)
                lim = float(torch.finfo(dt).max)  # a step past the dtype's range must not become inf
                xq = torch.from_numpy(np.clip(quant.dequantize(s, step, cfg.max_q), -lim, lim)).to(dt)
                qints = _np_int(xq).reshape(-1).copy()
                idx_raw = field_bytes(sec, "esc_idx", what)
                val_raw = field_bytes(sec, "esc_val", what)
                if len(idx_raw) % 4 or len(val_raw) != len(idx_raw) // 4 * es:
                    raise CodecError(f"{what}: escape indices and values disagree in count")
                idx = np.frombuffer(idx_raw, "<u4").astype(np.int64)
                flat_syms = s.reshape(-1)
                if idx.size and (idx.max() >= n or np.any(flat_syms[idx] != 2 * cfg.max_q + 1)):
                    raise CodecError(f"{what}: escape list does not match the escape symbols (corrupt stream)")
                if int((flat_syms == 2 * cfg.max_q + 1).sum()) != idx.size:
                    raise CodecError(f"{what}: {int((flat_syms == 2 * cfg.max_q + 1).sum())} escape symbols "
                                     f"but {idx.size} escaped values")
                qints[idx] = np.frombuffer(val_raw, idv)
                full[~exact] = qints.reshape(tq, hh, d)
            kv.append(_from_np_int(full, dt, (h.num_tokens, hh, d)))
        out.append((i, kv[0], kv[1]))
    return out


LAYER_CODECS: dict[str, tuple[Callable[..., list[dict[str, Any]]], Callable[..., list[LayerKV]]]] = {
    "raw": (_encode_raw, _decode_raw),
    "zstd": (_encode_zstd, _decode_zstd),
    "lossless": (_encode_lossless, _decode_lossless),
    "quant": (_encode_quant, _decode_quant),
}
