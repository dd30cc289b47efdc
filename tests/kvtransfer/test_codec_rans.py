"""Interleaved rANS reference: round trips, table rules, and cost vs the empirical entropy."""

import numpy as np
import pytest

from kvtransfer.codec import CodecError
from kvtransfer.codec import rans


def _laplace_syms(rng, s, n, alphabet=64, scale=2.0):
    half = alphabet // 2 - 1
    return (np.clip(np.round(rng.laplace(0, scale, size=(s, n))), -half, half) + half).astype(np.int64)


def _code(syms, tabs, num_tables, alphabet, lane_len=2048):
    counts = np.bincount((tabs * alphabet + syms).ravel(), minlength=num_tables * alphabet)
    freq = rans.normalize_counts(counts.reshape(num_tables, alphabet))
    return freq, rans.encode_segments(syms, tabs, freq, lane_len)


@pytest.mark.parametrize("n", [1, 2, 31, 32, 33, 64 * 33 + 5, 70001])
def test_round_trip_awkward_lengths(n):
    rng = np.random.default_rng(n)
    syms = _laplace_syms(rng, 3, n)
    tabs = np.broadcast_to((np.arange(n) // 5) % 2, (3, n)) + 2 * np.arange(3)[:, None]
    freq, segs = _code(syms, tabs, 6, 64, lane_len=64)
    assert (rans.decode_segments(segs, tabs, freq) == syms).all()


def test_cost_within_one_percent_of_empirical_entropy():
    rng = np.random.default_rng(0)
    n = 256 * 8 * 128  # one head-table layer segment of a 256-token Llama-3-8B chunk
    syms = _laplace_syms(rng, 2, n, scale=1.5)
    tabs = np.broadcast_to((np.arange(n) // 128) % 8, (2, n)) + 8 * np.arange(2)[:, None]
    freq, segs = _code(syms, tabs, 16, 64)
    coded = 8 * sum(s.num_bytes for s in segs)
    ideal = rans.ideal_bits(syms, tabs, 16, 64)
    assert coded <= 1.01 * ideal, (coded, ideal)
    assert coded >= ideal * 0.999  # a coder cannot beat the entropy of its own model


def test_normalized_tables_sum_and_keep_every_present_symbol():
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 3, size=(50, 256)) * rng.integers(0, 10**6, size=(50, 256))
    counts[0] = 0
    counts[1, 7] = 10**9
    freq = rans.normalize_counts(counts)
    assert (freq.astype(np.int64).sum(1) == rans.PROB_SCALE).all()
    assert ((counts > 0) <= (freq > 0)).all()


def test_corrupt_words_or_states_are_detected():
    rng = np.random.default_rng(2)
    n = 5000
    syms = _laplace_syms(rng, 1, n)
    tabs = np.zeros((1, n), dtype=np.int64)
    freq, segs = _code(syms, tabs, 1, 64, lane_len=64)
    seg = segs[0]
    bad_words = seg.words.copy()
    bad_words[len(bad_words) // 2] ^= 0x5A5A
    with pytest.raises(CodecError):
        rans.decode_segments([rans.RansSegment(n, 64, seg.counts, seg.states, bad_words)], tabs, freq)
    with pytest.raises(CodecError):
        rans.decode_segments([rans.RansSegment(n, 64, seg.counts, seg.states, seg.words[:-1])], tabs, freq)


def test_table_bytes_round_trip_and_reject_garbage():
    freq = rans.normalize_counts(np.array([[0, 5, 9, 0], [1, 0, 0, 0]]))
    assert (rans.table_from_bytes(rans.table_to_bytes(freq), 2, 4) == freq).all()
    assert (rans.cdf16_from_bytes(rans.cdf16_to_bytes(freq), 2, 4) == freq).all()
    with pytest.raises(CodecError):
        rans.table_from_bytes(rans.table_to_bytes(freq)[:-1], 2, 4)
    with pytest.raises(CodecError):
        rans.table_from_bytes(b"\x00\x09" + b"\x00" * 30, 1, 4)
