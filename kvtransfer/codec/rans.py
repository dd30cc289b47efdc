"""Interleaved rANS, CPU reference (numpy, vectorized over lanes; loops over lane steps).

Stream model (the GPU kernels in kernels/codec_rans.py produce the same bytes):

    segment of n symbols (uint8, alphabet A <= 256), each with a table id
      -> num_lanes = 32 * num_groups lanes, num_groups = ceil(n / (32 * lane_len))
      -> symbol i is coded by lane i % num_lanes at step i // num_lanes
    state: 32-bit, x in [2^16, 2^32); probabilities in 1/2^14 units; 16-bit renormalization,
    so at most one 16-bit word moves per symbol per lane.
    the 32 lanes of a group share one word stream: at decode step t, the lanes of a group that
    need a word take consecutive words in lane order. The encoder runs the steps backwards and
    fills each group's stream from its end, so the decoder reads it front to back.
    each lane starts encoding at x = 2^16 and its final state is stored (u32); a decoder that
    does not end at 2^16 in every lane, or does not consume exactly the group's words, has
    been handed a corrupt stream.

Frequency tables: counts normalized to sum 2^14 with the deterministic integer rule in
`normalize_counts` (every present symbol gets >= 1; the remainder goes to the most frequent).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvtransfer.codec.errors import CodecError

PROB_BITS = 14
PROB_SCALE = 1 << PROB_BITS
RANS_L = 1 << 16
GROUP = 32


def plan_lanes(n: int, lane_len: int) -> tuple[int, int, int]:
    """(num_groups, num_lanes, num_steps) for a segment of n symbols."""
    num_groups = max(1, -(-n // (GROUP * lane_len)))
    num_lanes = num_groups * GROUP
    return num_groups, num_lanes, max(1, -(-n // num_lanes))


def normalize_counts(counts: np.ndarray) -> np.ndarray:
    """[num_tables, A] int64 counts -> [num_tables, A] uint32 frequencies summing to 2^14."""
    counts = counts.astype(np.int64)
    nt, a = counts.shape
    total = counts.sum(1, keepdims=True)
    safe_total = np.maximum(total, 1)
    freq = counts * (PROB_SCALE - a) // safe_total + (counts > 0)
    rem = PROB_SCALE - freq.sum(1)
    top = counts.argmax(1)
    freq[np.arange(nt), top] += rem  # an empty table puts all mass on symbol 0
    return freq.astype(np.uint32)


def cumulative(freq: np.ndarray) -> np.ndarray:
    cum = np.zeros_like(freq)
    cum[:, 1:] = np.cumsum(freq, 1)[:, :-1]
    return cum


@dataclass
class RansSegment:
    """One coded segment: per-group word counts, per-lane final states, concatenated words."""
    n: int
    lane_len: int
    counts: np.ndarray   # [num_groups] uint32
    states: np.ndarray   # [num_lanes] uint32
    words: np.ndarray    # [sum(counts)] uint16

    @property
    def num_bytes(self) -> int:
        return 4 * self.counts.size + 4 * self.states.size + 2 * self.words.size


def encode_segments(syms: np.ndarray, tabs: np.ndarray, freq: np.ndarray, lane_len: int) -> list[RansSegment]:
    """Encode S equal-length segments at once.

    syms: [S, n] integer symbols; tabs: [S, n] table ids (rows of `freq`); freq: [NT, A].
    Every symbol must have a nonzero frequency in its table.
    """
    s_count, n = syms.shape
    a = freq.shape[1]
    num_groups, num_lanes, steps = plan_lanes(n, lane_len)
    pad = steps * num_lanes - n
    flat_idx = (tabs.astype(np.int64) * a + syms.astype(np.int64))
    flat_idx = np.pad(flat_idx, ((0, 0), (0, pad))).reshape(s_count, steps, num_lanes)
    f_all = freq.reshape(-1).astype(np.uint64)
    c_all = cumulative(freq).reshape(-1).astype(np.uint64)
    rows = s_count * num_groups
    x = np.full((rows, GROUP), RANS_L, dtype=np.uint64)
    cap = steps * GROUP
    buf = np.zeros((rows, cap), dtype=np.uint16)
    end = np.full(rows, cap, dtype=np.int64)
    row_ix = np.broadcast_to(np.arange(rows)[:, None], (rows, GROUP))
    lane_pos = np.arange(num_lanes).reshape(num_groups, GROUP)
    full = np.ones((rows, GROUP), dtype=bool)
    shift = np.uint64(32 - PROB_BITS)
    for t in range(steps - 1, -1, -1):
        idx = flat_idx[:, t, :].reshape(rows, GROUP)
        f = f_all[idx]
        c = c_all[idx]
        if t * num_lanes + num_lanes > n:
            active = np.broadcast_to((t * num_lanes + lane_pos < n)[None], (s_count, num_groups, GROUP)).reshape(rows, GROUP)
            f = np.where(active, f, np.uint64(1))
        else:
            active = full
        need = active & (x >= (f << shift))
        k = need.sum(1)
        if k.any():
            rank = np.cumsum(need, 1) - need
            pos = (end - k)[:, None] + rank
            buf[row_ix[need], pos[need]] = (x[need] & np.uint64(0xFFFF)).astype(np.uint16)
            end -= k
            x = np.where(need, x >> np.uint64(16), x)
        enc = ((x // f) << np.uint64(PROB_BITS)) + (x % f) + c
        x = np.where(active, enc, x) if active is not full else enc
    out = []
    x = x.reshape(s_count, num_lanes).astype(np.uint32)
    for s in range(s_count):
        r0 = s * num_groups
        counts = (cap - end[r0:r0 + num_groups]).astype(np.uint32)
        words = np.concatenate([buf[r0 + g, end[r0 + g]:] for g in range(num_groups)])
        out.append(RansSegment(n, lane_len, counts, x[s].copy(), words))
    return out


def decode_segments(segs: list[RansSegment], tabs: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """Decode S segments of equal n (same lane plan) -> [S, n] uint8 symbols."""
    s_count = len(segs)
    n, lane_len = segs[0].n, segs[0].lane_len
    a = freq.shape[1]
    num_groups, num_lanes, steps = plan_lanes(n, lane_len)
    for seg in segs:
        if seg.n != n or seg.lane_len != lane_len:
            raise CodecError("rANS segments of one batch must share n and lane_len")
        if seg.counts.size != num_groups or seg.states.size != num_lanes:
            raise CodecError(f"rANS segment: expected {num_groups} group counts and {num_lanes} lane "
                             f"states, found {seg.counts.size} and {seg.states.size}")
        if int(seg.counts.astype(np.int64).sum()) != seg.words.size:
            raise CodecError("rANS segment: group word counts do not add up to the words present")
    rows = s_count * num_groups
    words = np.concatenate([seg.words for seg in segs] + [np.zeros(1, np.uint16)]).astype(np.uint64)
    counts = np.concatenate([seg.counts for seg in segs]).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    stop = start + counts
    ptr = start.copy()
    x = np.concatenate([seg.states for seg in segs]).astype(np.uint64).reshape(rows, GROUP)
    if np.any(x < RANS_L):
        raise CodecError("rANS segment: a lane state is below 2^16 (corrupt stream)")
    tabs_p = np.pad(tabs.astype(np.int64), ((0, 0), (0, steps * num_lanes - n))).reshape(s_count, steps, num_lanes)
    f_all = freq.reshape(-1).astype(np.uint64)
    cum = cumulative(freq)
    c_all = cum.reshape(-1).astype(np.uint64)
    # Global sorted key: table * 2^14 + cumulative start; a lookup finds the symbol by slot.
    keys = (np.arange(freq.shape[0], dtype=np.int64)[:, None] * PROB_SCALE + cum.astype(np.int64)).reshape(-1)
    keys = np.where(freq.reshape(-1) > 0, keys, -1)  # zero-frequency symbols never match
    order = np.flatnonzero(keys >= 0)
    keys_sorted = keys[order]
    out = np.zeros((s_count, steps, num_lanes), dtype=np.uint8)
    lane_pos = np.arange(num_lanes).reshape(num_groups, GROUP)
    mask_lo = np.uint64(PROB_SCALE - 1)
    for t in range(steps):
        tb = tabs_p[:, t, :].reshape(rows, GROUP)
        slot = x & mask_lo
        hit = np.searchsorted(keys_sorted, tb * PROB_SCALE + slot.astype(np.int64), side="right") - 1
        idx = order[np.clip(hit, 0, order.size - 1)]
        f = f_all[idx]
        c = c_all[idx]
        dec = f * (x >> np.uint64(PROB_BITS)) + slot - c
        if t * num_lanes + num_lanes > n:
            active = np.broadcast_to((t * num_lanes + lane_pos < n)[None], (s_count, num_groups, GROUP)).reshape(rows, GROUP)
            x = np.where(active, dec, x)
        else:
            active = None
            x = dec
        out[:, t, :] = (idx - (idx // a) * a).reshape(s_count, num_lanes)
        need = x < RANS_L
        if active is not None:
            need &= active
        k = need.sum(1)
        if k.any():
            rank = np.cumsum(need, 1) - need
            pos = np.minimum(ptr[:, None] + rank, words.size - 1)
            x = np.where(need, (x << np.uint64(16)) | words[pos], x)
            ptr += k
    if np.any(ptr != stop) or np.any(x != RANS_L):
        raise CodecError("rANS segment did not decode cleanly (corrupt or truncated stream)")
    return out.reshape(s_count, steps * num_lanes)[:, :n]


def table_to_bytes(freq: np.ndarray) -> bytes:
    """Compact tables: per table (lo, hi) as u8 pairs, then the u16 frequencies of lo..hi."""
    nt, a = freq.shape
    parts, bounds = [], np.zeros((nt, 2), dtype=np.uint8)
    for i in range(nt):
        nz = np.flatnonzero(freq[i])
        lo, hi = int(nz[0]), int(nz[-1])
        bounds[i] = (lo, hi)
        parts.append(freq[i, lo:hi + 1].astype("<u2").tobytes())
    return bounds.tobytes() + b"".join(parts)


def table_from_bytes(data: bytes, num_tables: int, alphabet: int) -> np.ndarray:
    if len(data) < 2 * num_tables:
        raise CodecError(f"frequency tables truncated: {len(data)} bytes for {num_tables} tables")
    bounds = np.frombuffer(data[:2 * num_tables], dtype=np.uint8).reshape(num_tables, 2).astype(np.int64)
    freq = np.zeros((num_tables, alphabet), dtype=np.uint32)
    off = 2 * num_tables
    for i, (lo, hi) in enumerate(bounds):
        if hi < lo or hi >= alphabet:
            raise CodecError(f"frequency table {i}: bad symbol range {lo}..{hi} for alphabet {alphabet}")
        m = hi - lo + 1
        chunk = data[off:off + 2 * m]
        if len(chunk) != 2 * m:
            raise CodecError(f"frequency table {i} truncated")
        freq[i, lo:hi + 1] = np.frombuffer(chunk, dtype="<u2")
        off += 2 * m
    if off != len(data):
        raise CodecError(f"frequency tables: {len(data) - off} trailing bytes")
    check_tables(freq)
    return freq


def check_tables(freq: np.ndarray) -> None:
    sums = freq.astype(np.int64).sum(1)
    if np.any(sums != PROB_SCALE):
        bad = int(np.flatnonzero(sums != PROB_SCALE)[0])
        raise CodecError(f"frequency table {bad} sums to {int(sums[bad])}, expected {PROB_SCALE}")


def cdf16_to_bytes(freq: np.ndarray) -> bytes:
    """CacheGen-style side info: the full 16-bit CDF (A + 1 entries) of every table."""
    cdf = np.zeros((freq.shape[0], freq.shape[1] + 1), dtype="<u2")
    cdf[:, 1:] = np.minimum(np.cumsum(freq.astype(np.int64), 1), 0xFFFF)
    return cdf.tobytes()


def cdf16_from_bytes(data: bytes, num_tables: int, alphabet: int) -> np.ndarray:
    if len(data) != num_tables * (alphabet + 1) * 2:
        raise CodecError(f"CDF tables: expected {num_tables * (alphabet + 1) * 2} bytes, found {len(data)}")
    cdf = np.frombuffer(data, dtype="<u2").reshape(num_tables, alphabet + 1).astype(np.int64)
    freq = np.diff(cdf, axis=1)
    if np.any(freq < 0):
        raise CodecError("CDF tables are not monotone")
    freq = freq.astype(np.uint32)
    check_tables(freq)
    return freq


def ideal_bits(syms: np.ndarray, tabs: np.ndarray, num_tables: int, alphabet: int) -> float:
    """Empirical entropy (bits) of the symbols under per-table empirical distributions."""
    counts = np.bincount((tabs.astype(np.int64) * alphabet + syms).reshape(-1),
                         minlength=num_tables * alphabet).reshape(num_tables, alphabet).astype(np.float64)
    tot = counts.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(counts > 0, counts / np.maximum(tot, 1), 1.0)
    return float(-(counts * np.log2(p)).sum())
