"""Entropy-coded segments: symbols + their tables -> a msgpack-ready map, and back.

A segment map is {"tables": bytes, "rans": [group_counts u32, lane_states u32, words u16]}
or {"stored": bytes} (the uint8 symbols as they are, when coding would not be smaller).
Table side info is compact (per table: symbol range + u16 frequencies) except for the
CacheGen baseline, which ships the full 16-bit CDF per table as released.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvtransfer.codec import rans
from kvtransfer.codec.errors import CodecError


def table_ids(n: int, num_kv_heads: int, head_dim: int, mode: str) -> tuple[np.ndarray, int]:
    """Local table id of each flat element of a [tokens, heads, head_dim] tensor, and the count."""
    i = np.arange(n, dtype=np.int64)
    if mode == "channel_cdf16":
        return i % (num_kv_heads * head_dim), num_kv_heads * head_dim
    return (i // head_dim) % num_kv_heads, num_kv_heads


def _tables_bytes(freq: np.ndarray, mode: str) -> bytes:
    return rans.cdf16_to_bytes(freq) if mode == "channel_cdf16" else rans.table_to_bytes(freq)


def _tables_parse(data: bytes, num_tables: int, alphabet: int, mode: str) -> np.ndarray:
    if mode == "channel_cdf16":
        return rans.cdf16_from_bytes(data, num_tables, alphabet)
    return rans.table_from_bytes(data, num_tables, alphabet)


def encode(syms: np.ndarray, tabs: np.ndarray, num_tables: int, alphabet: int, lane_len: int,
           mode: str) -> list[dict[str, Any]]:
    """syms [S, n] uint8, tabs [n] local table ids -> S segment maps (batched over S)."""
    s_count, n = syms.shape
    gtabs = tabs[None, :].astype(np.int64) + (np.arange(s_count, dtype=np.int64) * num_tables)[:, None]
    counts = np.bincount((gtabs * alphabet + syms).reshape(-1),
                         minlength=s_count * num_tables * alphabet).reshape(s_count * num_tables, alphabet)
    freq = rans.normalize_counts(counts)
    segs = rans.encode_segments(syms, gtabs, freq, lane_len)
    out = []
    for s, seg in enumerate(segs):
        tb = _tables_bytes(freq[s * num_tables:(s + 1) * num_tables], mode)
        if seg.num_bytes + len(tb) >= n:
            out.append({"stored": syms[s].astype(np.uint8).tobytes()})
        else:
            out.append({"tables": tb, "rans": [seg.counts.astype("<u4").tobytes(),
                                               seg.states.astype("<u4").tobytes(),
                                               seg.words.astype("<u2").tobytes()]})
    return out


def decode(maps: list[dict[str, Any]], n: int, tabs: np.ndarray, num_tables: int, alphabet: int,
           lane_len: int, mode: str, what: str) -> np.ndarray:
    """S segment maps -> [S, n] uint8 symbols. Coded segments are decoded as one batch."""
    out = np.zeros((len(maps), n), dtype=np.uint8)
    coded, freqs, segs = [], [], []
    for s, m in enumerate(maps):
        if not isinstance(m, dict):
            raise CodecError(f"{what}: segment {s} is not a map")
        if "stored" in m:
            raw = m["stored"]
            if not isinstance(raw, bytes) or len(raw) != n:
                raise CodecError(f"{what}: stored segment {s} has {len(raw) if isinstance(raw, bytes) else '?'} "
                                 f"bytes, expected {n}")
            out[s] = np.frombuffer(raw, dtype=np.uint8)
            continue
        parts = m.get("rans")
        if not isinstance(m.get("tables"), bytes) or not isinstance(parts, list) or len(parts) != 3 \
                or not all(isinstance(p, bytes) for p in parts):
            raise CodecError(f"{what}: segment {s} needs 'tables' bytes and 'rans' [counts, states, words]")
        if len(parts[0]) % 4 or len(parts[1]) % 4 or len(parts[2]) % 2:
            raise CodecError(f"{what}: segment {s} rANS arrays have ragged byte lengths")
        freqs.append(_tables_parse(m["tables"], num_tables, alphabet, mode))
        segs.append(rans.RansSegment(n, lane_len, np.frombuffer(parts[0], "<u4"), np.frombuffer(parts[1], "<u4"),
                                     np.frombuffer(parts[2], "<u2")))
        coded.append(s)
    if coded:
        freq = np.concatenate(freqs)
        gtabs = tabs[None, :].astype(np.int64) + (np.arange(len(coded), dtype=np.int64) * num_tables)[:, None]
        try:
            out[coded] = rans.decode_segments(segs, gtabs, freq)
        except CodecError as exc:
            raise CodecError(f"{what}: {exc}") from None
        present = freq > 0
        syms = out[coded].astype(np.int64)
        if not present.reshape(-1)[(gtabs * alphabet + syms).reshape(-1)].all():
            raise CodecError(f"{what}: decoded a symbol its table does not contain (corrupt stream)")
    return out
