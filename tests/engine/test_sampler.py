"""Sampling: seeded requests reproduce in any batch, and top-k / top-p never leave their sets."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.request import SamplingParams
from engine.sampler import filter_logits, sample
from tests.engine.conftest import make_tiny_engine

VOCAB = 64


def nucleus(logits: torch.Tensor, top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches top_p, computed
    independently of the sampler (float64, one token at a time)."""
    probs = torch.softmax(logits.double(), -1)
    order = torch.argsort(probs, descending=True).tolist()
    kept, mass = set(), 0.0
    for t in order:
        kept.add(t)
        mass += probs[t].item()
        if mass >= top_p - 1e-6:
            break
    return kept


def test_seeded_rows_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, VOCAB) * 3
    params = [SamplingParams(temperature=1.0, seed=100 + i) for i in range(6)]
    positions = [10, 11, 12, 13, 14, 15]
    full = sample(logits, params, positions)
    assert sample(logits, params, positions) == full           # rerun reproduces
    for subset in ([3], [5, 0], [4, 2, 1]):                     # other batch compositions
        torch.manual_seed(123)                                 # the global RNG must not matter
        got = sample(logits[subset], [params[i] for i in subset], [positions[i] for i in subset])
        assert got == [full[i] for i in subset]
    # the seed and the position both matter: some draw changes when either does
    other_seed = [SamplingParams(temperature=1.0, seed=999 + i) for i in range(6)]
    assert sample(logits, other_seed, positions) != full
    assert sample(logits, params, [p + 1 for p in positions]) != full


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), top_k=st.integers(1, VOCAB), temp=st.floats(0.3, 3.0),
       scale=st.floats(0.1, 10.0))
def test_top_k_never_samples_outside_the_k_best(seed, top_k, temp, scale):
    gen = torch.Generator().manual_seed(seed)
    row = torch.randn(VOCAB, generator=gen) * scale
    allowed = set(torch.topk(row, top_k).indices.tolist()) | {
        t for t in range(VOCAB) if row[t] == torch.topk(row, top_k).values[-1]}  # ties at the k-th
    params = [SamplingParams(temperature=temp, top_k=top_k, seed=seed)] * 32
    tokens = sample(row.expand(32, VOCAB).clone(), params, list(range(32)))
    assert set(tokens) <= allowed


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), top_p=st.floats(0.01, 0.99), scale=st.floats(0.5, 8.0))
def test_top_p_never_samples_outside_the_nucleus(seed, top_p, scale):
    gen = torch.Generator().manual_seed(seed)
    row = torch.randn(VOCAB, generator=gen) * scale
    allowed = nucleus(row, top_p)
    params = [SamplingParams(temperature=1.0, top_p=top_p, seed=seed)] * 32
    tokens = sample(row.expand(32, VOCAB).clone(), params, list(range(32)))
    assert set(tokens) <= allowed
    kept = torch.isfinite(filter_logits(row, 0, top_p)).nonzero().flatten().tolist()
    assert set(kept) == allowed


def test_top_k_and_top_p_together_keep_the_intersection():
    row = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])
    kept = torch.isfinite(filter_logits(row, 3, 0.5)).nonzero().flatten().tolist()
    assert kept == [0]                      # top-1 already holds > 0.5 of the top-3 mass
    kept = torch.isfinite(filter_logits(row, 2, 1.0)).nonzero().flatten().tolist()
    assert kept == [0, 1]


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(5, VOCAB)
    assert sample(logits, [SamplingParams()] * 5, [0] * 5) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("companions", [0, 3])
def test_seeded_request_reproduces_through_the_engine(companions):
    """The same seeded request gives the same tokens alone and batched with others."""
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)

    def run(n_others: int) -> list[int]:
        engine = make_tiny_engine(num_blocks=64)
        req = engine.add_request(list(range(1, 20)), params)
        for i in range(n_others):
            engine.add_request(list(range(30 + i, 45 + 3 * i)),
                               SamplingParams(max_tokens=5 + i, temperature=0.7, seed=i))
        while engine.has_unfinished:
            engine.step()
        return req.output_token_ids

    alone = run(0)
    assert len(alone) == 12 and len(set(alone)) > 1
    assert run(companions) == alone
