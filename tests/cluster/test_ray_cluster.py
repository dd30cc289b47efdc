"""The real thing: instances as Ray actors on a local Ray instance. Token-identical greedy
outputs with 2 prefill + 2 decode actors, then a decode actor killed mid-run."""

from __future__ import annotations

import pytest

from cluster.cluster import Cluster
from engine.request import SamplingParams
from tests.cluster.conftest import NEW_TOKENS, assert_no_leaks, cluster_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    cluster = Cluster.start(cluster_config())
    yield cluster
    cluster.shutdown()
    ray.shutdown()


def test_outputs_match_transformers_over_ray(ray_cluster, prompts, hf_outputs):
    ids = [ray_cluster.submit(p, SamplingParams(max_tokens=NEW_TOKENS)) for p in prompts]
    ray_cluster.wait(ids, timeout_s=300)
    got = [ray_cluster.frontend.requests[r].tokens for r in ids]
    assert got == hf_outputs
    assert_no_leaks(ray_cluster.instance_stats())


def test_killing_a_decode_actor_mid_run(ray_cluster, prompts):
    import ray

    frontend = ray_cluster.frontend
    ids = [ray_cluster.submit(prompts[i % len(prompts)], SamplingParams(max_tokens=48, ignore_eos=True))
           for i in range(12)]
    # wait until both decode instances hold running requests, then kill one
    for _ in range(2000):
        frontend.poll(0.02)
        if {frontend.requests[r].decode for r in ids if frontend.requests[r].state == "decode"} >= {"decode-0", "decode-1"}:
            break
    victims = [r for r in ids if frontend.requests[r].decode == "decode-1" and not frontend.requests[r].done]
    assert victims, "decode-1 never received a request"
    ray.kill(ray_cluster.pool.actors["decode-1"])
    ray_cluster.wait(ids, timeout_s=300)   # the run completes: nothing hangs
    for r in ids:
        t = frontend.requests[r]
        assert t.state == "finished" or (t.state == "failed" and "decode-1" in t.reason), (r, t.state, t.reason)
    assert any(frontend.requests[r].state == "failed" for r in victims)
    # the survivors keep serving
    later = [ray_cluster.submit(p, SamplingParams(max_tokens=8)) for p in prompts[:4]]
    ray_cluster.wait(later, timeout_s=300)
    for r in later:
        t = frontend.requests[r]
        assert t.state == "finished" and t.decode == "decode-0", (t.state, t.reason)
    assert_no_leaks(ray_cluster.instance_stats())
