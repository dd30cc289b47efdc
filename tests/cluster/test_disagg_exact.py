"""Greedy outputs of the disaggregated cluster are token-identical to transformers' generate
and to the colocated engine, for real ShareGPT prompts, with 2 prefill and 2 decode instances
and the KV moving over the TCP channel raw or losslessly coded."""

from __future__ import annotations

import pytest

from cluster.cluster import Cluster
from engine.request import SamplingParams
from tests.cluster.conftest import NEW_TOKENS, assert_no_leaks, cluster_config

pytestmark = pytest.mark.slow


def run_all(cluster: Cluster, prompts: list[list[int]]) -> list[list[int]]:
    ids = [cluster.submit(p, SamplingParams(max_tokens=NEW_TOKENS)) for p in prompts]
    cluster.wait(ids, timeout_s=300)
    for rid in ids:
        t = cluster.frontend.requests[rid]
        assert t.state == "finished", (rid, t.state, t.reason)
    return [cluster.frontend.requests[r].tokens for r in ids]


@pytest.mark.parametrize("codec", ["raw", "lossless"])
def test_disagg_matches_transformers(codec, prompts, hf_outputs):
    cluster = Cluster.in_process(cluster_config(kv_transfer={"codec": codec}))
    try:
        outputs = run_all(cluster, prompts)
        records = cluster.frontend.records()
        stats = cluster.instance_stats()
    finally:
        cluster.shutdown()
    assert outputs == hf_outputs
    # both pools served, and the KV really crossed the channel
    assert {r.prefill_instance for r in records} == {"prefill-0", "prefill-1"}
    assert {r.decode_instance for r in records} == {"decode-0", "decode-1"}
    assert all(r.kv_bytes_raw > 0 for r in records if r.output_tokens > 1)
    if codec == "lossless":
        assert sum(r.kv_bytes_wire for r in records) < sum(r.kv_bytes_raw for r in records)
    assert_no_leaks(stats)


def test_colocated_modes_match_too(prompts, hf_outputs):
    for mode in ("colocated", "chunked"):
        cluster = Cluster.in_process(cluster_config(mode=mode, prefill={"instances": 1}, decode={"instances": 1}))
        try:
            assert run_all(cluster, prompts) == hf_outputs, mode
            assert_no_leaks(cluster.instance_stats())
        finally:
            cluster.shutdown()
