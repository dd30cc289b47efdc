"""On a GPU: greedy outputs of the disaggregated cluster are token-identical to the colocated
engine's, with the KV leaving the prefill GPU in runs of layers, landing in pinned memory and
staged on the decode GPU (raw), or coded and decoded on the GPUs (lossless). One request at a
time, so that both sides run the same batch shapes."""

from __future__ import annotations

import random

import pytest
import torch

from cluster.cluster import Cluster
from cluster.config import parse_cluster_config
from engine.request import SamplingParams
from tests.cluster.conftest import assert_no_leaks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _config(mode: str, codec: str = "raw"):
    return parse_cluster_config({
        "model": {"name": "tiny-gqa", "weights": "dummy", "dtype": "float32"}, "device": "cuda", "mode": mode,
        "prefill": {"instances": 1, "max_batch_tokens": 1024, "kv_blocks": 256},
        "decode": {"instances": 1, "max_batch_size": 8, "kv_blocks": 256},
        "kv_transfer": {"transport": "tcp", "codec": codec, "timeout_s": 30}})


def _one_at_a_time(cluster: Cluster, prompts: list[list[int]]) -> list[list[int]]:
    out = []
    for p in prompts:
        rid = cluster.submit(p, SamplingParams(max_tokens=12, ignore_eos=True))
        cluster.wait([rid], timeout_s=120)
        t = cluster.frontend.requests[rid]
        assert t.state == "finished", (rid, t.state, t.reason)
        out.append(t.tokens)
    return out


@pytest.mark.parametrize("codec", ["raw", "lossless"])
def test_gpu_disagg_matches_colocated(codec):
    rng = random.Random(5)
    prompts = [[rng.randrange(1, 512) for _ in range(n)] for n in (3, 17, 64, 130, 301)]
    outputs = {}
    for mode in ("colocated", "disagg"):
        cluster = Cluster.in_process(_config(mode, codec))
        try:
            outputs[mode] = _one_at_a_time(cluster, prompts)
            records = cluster.frontend.records()
            assert_no_leaks(cluster.instance_stats())
        finally:
            cluster.shutdown()
    assert outputs["disagg"] == outputs["colocated"]
    assert all(r.kv_bytes_raw > 0 for r in records)        # the KV really crossed the channel
    assert len({tuple(o) for o in outputs["disagg"]}) > 1    # the prompts lead to different tokens
