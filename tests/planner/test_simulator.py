from dataclasses import replace

import pytest

from engine.metrics import summarize
from planner.search import Budget, sim_setup
from planner.simulator import Simulator
from planner.transfer import LinkModel


def _run(config, perf, workload, rate, n=150, link=None):
    setup = sim_setup(config, perf, Budget(8, 8))
    if link is not None:
        setup.link = lambda p, d: link
    sim = Simulator(config, setup)
    prompts, outputs, arrivals = workload.trace(n, rate)
    records = sim.run(prompts, outputs, arrivals)
    return sim, records, summarize(records, config.slo.ttft_s, config.slo.tpot_s, rate)


def test_single_request_times_match_the_step_model(small_config, small_perf, step_model, workload):
    sim = Simulator(small_config, sim_setup(small_config, small_perf, Budget(2, 2)))
    rec = sim.run([100], [5], [1.0])[0]
    assert rec.ok and rec.output_tokens == 5
    # one prefill step of 100 tokens -> first token
    assert rec.ttft_s == pytest.approx(step_model.prefill_time(100, 100 * 100), rel=1e-6)
    # then transfer, then 4 decode steps at batch 1: TPOT is at least the decode step
    assert rec.tpot_s >= step_model.decode_time(1, 101)
    assert rec.tpot_s < step_model.decode_time(1, 101) * 1.5


def test_load_raises_latency_and_blocks_come_back(small_config, small_perf, workload):
    _, _, low = _run(small_config, small_perf, workload, 0.5)
    sim, records, high = _run(small_config, small_perf, workload, 20.0)
    assert low["num_finished"] == low["num_requests"] == 150
    assert high["num_finished"] == 150
    assert low["attainment"] >= 0.95
    assert high["attainment"] < low["attainment"]
    assert high["tpot_p90"] > 2 * low["tpot_p90"]
    for inst in sim.instances.values():  # every KV block returned exactly once
        assert inst.blocks.num_free == inst.blocks.num_blocks
    assert all(r.decode_instance == "decode-0" for r in records)


def test_more_decode_instances_help_a_decode_bound_load(small_config, small_perf, workload):
    _, _, one = _run(small_config, small_perf, workload, 6.0)
    two = replace(small_config, decode=replace(small_config.decode, instances=2))
    sim, records, s2 = _run(two, small_perf, workload, 6.0)
    assert s2["tpot_p90"] < one["tpot_p90"]
    assert {r.decode_instance for r in records} == {"decode-0", "decode-1"}  # the router spreads


def test_slow_link_stretches_tpot_and_compression_recovers_it(small_config, small_perf, workload):
    fast = LinkModel("fast", 2e9)
    slow = LinkModel("slow", 2e6)  # 16 Mb/s
    _, _, f = _run(small_config, small_perf, workload, 1.0, 60, fast)
    _, _, s = _run(small_config, small_perf, workload, 1.0, 60, slow)
    assert s["tpot_p50"] > 2 * f["tpot_p50"]
    assert s["ttft_p50"] == pytest.approx(f["ttft_p50"], rel=0.05)  # the first token comes from prefill
    comp = replace(small_config, kv_transfer=replace(small_config.kv_transfer, codec="aggressive"))
    _, _, c = _run(comp, small_perf, workload, 1.0, 60, slow)
    assert c["tpot_p50"] < s["tpot_p50"] / 2


@pytest.mark.parametrize("mode", ["colocated", "chunked"])
def test_colocated_modes_run_the_runtime_policies(small_config, small_perf, workload, mode):
    sim, records, s = _run(small_config.with_mode(mode), small_perf, workload, 1.0, 80)
    assert s["num_finished"] == 80
    assert all(r.decode_instance in ("prefill-0", "decode-0") for r in records)
    policy = {"colocated": "ContinuousBatchingScheduler", "chunked": "ChunkedPrefillScheduler"}[mode]
    assert type(sim.instances["prefill-0"].scheduler).__name__ == policy
