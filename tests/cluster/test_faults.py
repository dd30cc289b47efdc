"""Failure behaviour: aborts, failed transfers and oversized prompts end cleanly (finished,
retried or failed with a reason), never hang, never leak KV blocks on either side."""

from __future__ import annotations

import random

import pytest

from cluster.cluster import Cluster
from decode_worker.worker import DecodeWorker
from engine.request import SamplingParams
from tests.cluster.conftest import assert_no_leaks, cluster_config

pytestmark = pytest.mark.slow


def test_aborts_and_failed_transfers_leak_nothing(monkeypatch, prompts):
    rng = random.Random(3)
    doomed: set[str] = set()   # requests whose KV arrives corrupt at every decode instance
    flaky: dict[str, int] = {}  # requests whose first transfer fails, then succeed on retry
    real_write = DecodeWorker.write_frame

    def write_frame(self, res, frame):
        rid = res.request_id
        if rid in doomed or (rid in flaky and flaky[rid] == 0):
            if frame.first <= 3 < frame.first + frame.kv.shape[0]:
                flaky[rid] = flaky.get(rid, 0) + 1 if rid in flaky else 0
                raise ValueError("injected: corrupt KV section")
        return real_write(self, res, frame)

    monkeypatch.setattr(DecodeWorker, "write_frame", write_frame)
    cluster = Cluster.in_process(cluster_config(kv_transfer={"max_retries": 1}))
    try:
        ids = []
        for i in range(24):
            rid = f"r{i}"
            if i % 6 == 1:
                doomed.add(rid)
            elif i % 6 == 2:
                flaky[rid] = 0
            ids.append(cluster.submit(prompts[i % len(prompts)], SamplingParams(max_tokens=rng.randint(2, 12)), rid))
            if rng.random() < 0.5:
                cluster.frontend.poll(0.01)
            if i % 5 == 4:
                cluster.frontend.abort(ids[rng.randrange(len(ids))])
        cluster.wait(ids, timeout_s=300)
        requests = cluster.frontend.requests
        for rid in ids:
            t = requests[rid]
            assert t.state in ("finished", "failed", "aborted"), (rid, t.state)
            assert t.state == "finished" or t.reason, (rid, t.state)
        for rid in doomed:
            if requests[rid].state != "aborted":
                assert requests[rid].state == "failed" and "corrupt" in requests[rid].reason, requests[rid].reason
        retried = [rid for rid in flaky if requests[rid].state == "finished"]
        assert retried and all(requests[rid].retries == 1 for rid in retried)
        assert_no_leaks(cluster.instance_stats())
    finally:
        cluster.shutdown()


def test_oversized_prompt_fails_alone(prompts):
    cluster = Cluster.in_process(cluster_config(engine={"max_model_len": 256}, prefill={"instances": 1},
                                                decode={"instances": 1}))
    try:
        good = cluster.submit(prompts[0], SamplingParams(max_tokens=4))
        bad = cluster.submit(list(range(1, 300)), SamplingParams(max_tokens=4))
        cluster.wait([good, bad], timeout_s=120)
        assert cluster.frontend.requests[good].state == "finished"
        t = cluster.frontend.requests[bad]
        assert t.state == "failed" and "prompt" in t.reason and "max_model_len" in t.reason
        assert_no_leaks(cluster.instance_stats())
    finally:
        cluster.shutdown()
