"""Tensor parallelism per phase, with KV resharded between any prefill TP and decode TP:
greedy outputs are token-identical to TP 1, for every (prefill TP, decode TP) pair.

One Ray cluster per model holds an instance of every TP size in each pool; requests are
pinned to each (prefill, decode) pair in turn.
"""

from __future__ import annotations

import itertools

import pytest

from cluster.cluster import Cluster
from cluster.launcher import InstancePlan
from engine.request import SamplingParams
from tests.cluster.conftest import NEW_TOKENS, assert_no_leaks, cluster_config

pytestmark = pytest.mark.slow


def mixed_tp_cluster(config, sizes):
    plans = ([InstancePlan(f"prefill-{i}", "prefill", tp) for i, tp in enumerate(sizes)]
             + [InstancePlan(f"decode-{i}", "decode", tp) for i, tp in enumerate(sizes)])
    return Cluster.start(config, plans)


def run_pinned(cluster, prompts, params, sizes):
    """{(prefill tp, decode tp): [tokens per prompt]}"""
    ids = {}
    for (i, p_tp), (j, d_tp) in itertools.product(enumerate(sizes), repeat=2):
        ids[(p_tp, d_tp)] = [cluster.submit(p, params, route=(f"prefill-{i}", f"decode-{j}")) for p in prompts]
    cluster.wait([r for rs in ids.values() for r in rs], timeout_s=600)
    out = {}
    for pair, rids in ids.items():
        for r in rids:
            t = cluster.frontend.requests[r]
            assert t.state == "finished", (pair, t.state, t.reason)
            assert (t.prefill, t.decode) == cluster.frontend.requests[r].route
        out[pair] = [cluster.frontend.requests[r].tokens for r in rids]
    return out


@pytest.fixture
def ray_session():
    """A fresh local Ray per test, sized for that test's ranks."""
    ray = pytest.importorskip("ray")
    ray.shutdown()
    yield
    ray.shutdown()


def test_smollm2_tp3_every_pair_matches_transformers(ray_session, prompts, hf_outputs):
    # SmolLM2: 9 query / 3 KV heads -> TP 3 holds one KV head per rank
    cluster = mixed_tp_cluster(cluster_config(prefill={"instances": 2}, decode={"instances": 2}), [1, 3])
    try:
        got = run_pinned(cluster, prompts[:2], SamplingParams(max_tokens=NEW_TOKENS), [1, 3])
        assert_no_leaks(cluster.instance_stats())
    finally:
        cluster.shutdown()
    for pair, outputs in got.items():
        assert outputs == hf_outputs[:2], pair


def test_gqa_8x4_tp_1_2_4_every_pair_matches_tp1(ray_session):
    # 8 query / 4 KV heads: TP 4 splits KV heads one per rank; 4 -> 1 gathers, 1 -> 4 scatters
    config = cluster_config(model={"name": "tiny-gqa", "weights": "dummy"},
                            prefill={"instances": 3, "kv_blocks": 64}, decode={"instances": 3, "kv_blocks": 64})
    cluster = mixed_tp_cluster(config, [1, 2, 4])
    try:
        prompts = [[(7 * i + 3 * k) % 500 + 1 for k in range(n)] for i, n in enumerate((5, 37))]
        got = run_pinned(cluster, prompts, SamplingParams(max_tokens=16, ignore_eos=True), [1, 2, 4])
        assert_no_leaks(cluster.instance_stats())
    finally:
        cluster.shutdown()
    reference = got[(1, 1)]
    assert all(len(o) == 16 for o in reference)
    for pair, outputs in got.items():
        assert outputs == reference, pair
