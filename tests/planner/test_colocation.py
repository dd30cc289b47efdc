from dataclasses import replace

import pytest

from planner.colocation import CoreSharing, SharedCores
from planner.search import Budget, sim_setup
from planner.simulator import Simulator, _Clock

# two instances fit the cores; a third makes each step take 1.5x, prefill a little more
SHARING = CoreSharing({"decode": (1.0, 1.1, 1.5), "prefill": (1.0, 1.0, 1.6)}, cores=2)


def test_stretch_table_and_beyond_what_was_measured():
    assert SHARING.factor("decode", 1) == 1.0
    mixed = CoreSharing({"decode": (1.0, 1.1), "decode_mixed": (1.0, 1.7)})
    assert mixed.factor("decode", 2, mixed=True) == 1.7      # a prefill beside it
    assert mixed.factor("prefill", 2, mixed=True) == 1.1     # no table of its own: decode's
    assert SHARING.factor("prefill", 3) == 1.6
    assert SHARING.factor("decode", 6) == pytest.approx(3.0)   # grows in proportion past k = 3
    assert CoreSharing.from_json(SHARING.to_json()) == SHARING


def test_steps_that_overlap_share_the_cores():
    clock = _Clock()
    cores = SharedCores(clock, CoreSharing({"decode": (1.0, 2.0)}), {"a": 0, "b": 0, "c": 1})
    ends = {}
    clock.at(0.0, lambda: cores.run("a", "decode", 1.0, lambda: ends.setdefault("a", clock.now)))
    clock.at(0.5, lambda: cores.run("b", "decode", 1.0, lambda: ends.setdefault("b", clock.now)))
    clock.at(0.5, lambda: cores.run("c", "decode", 1.0, lambda: ends.setdefault("c", clock.now)))
    clock.run(lambda: None)
    # a: 0.5 s of work alone, the other 0.5 at half speed -> 1.5; b: 0.5 done by then, 0.5 alone
    assert ends["a"] == pytest.approx(1.5)
    assert ends["b"] == pytest.approx(2.0)
    assert ends["c"] == pytest.approx(1.5)   # another node: alone


def test_shared_cores_and_serving_overhead_slow_a_cluster_down(small_config, small_perf, workload):
    cfg = replace(small_config, prefill=replace(small_config.prefill, instances=2))
    prompts, outputs, arrivals = workload.trace(120, 10.0)
    busy = CoreSharing({"decode": (1.0, 2.0, 3.0)})   # one core: every busy instance slows the rest

    def tpot_p50(perf):
        recs = Simulator(cfg, sim_setup(cfg, perf, Budget(3, 3))).run(prompts, outputs, arrivals)
        tp = sorted(r.tpot_s for r in recs if r.ok)
        return tp[len(tp) // 2]
    alone = tpot_p50(small_perf)
    shared = tpot_p50(replace(small_perf, sharing=busy))
    slow = tpot_p50(replace(small_perf, sharing=busy, overhead_s={"decode": 0.02}))
    assert shared > alone * 1.2
    assert slow > shared + 0.02
    # one request alone: no one to share with, the overhead is added to each step
    perf = replace(small_perf, sharing=SHARING, overhead_s={"prefill": 0.05})
    rec = Simulator(cfg, sim_setup(cfg, perf, Budget(3, 3))).run([100], [5], [1.0])[0]
    assert rec.ttft_s == pytest.approx(small_perf.step_model(1).prefill_time(100, 100 * 100) + 0.05, rel=1e-6)


def test_a_cpu_codec_takes_cores_from_the_instances(small_config, small_perf, workload):
    cfg = replace(small_config, kv_transfer=replace(small_config.kv_transfer, codec="int8"))
    slow_codec = replace(small_perf.transfer, encode_bytes_per_s={"int8": 2e7}, decode_bytes_per_s={"int8": 2e7})
    prompts, outputs, arrivals = workload.trace(80, 3.0)

    def tpot_p50(perf):
        recs = Simulator(cfg, sim_setup(cfg, perf, Budget(2, 2))).run(prompts, outputs, arrivals)
        assert all(r.ok for r in recs)
        tp = sorted(r.tpot_s for r in recs)
        return tp[len(tp) // 2]
    apart = tpot_p50(replace(small_perf, transfer=slow_codec, sharing=None))
    shared = tpot_p50(replace(small_perf, transfer=slow_codec, sharing=CoreSharing({"decode": (1.0, 2.0, 3.0)})))
    assert shared > apart * 1.1


def test_admissions_cost_the_decode_step_that_takes_them(small_config, small_perf, workload):
    prompts, outputs, arrivals = workload.trace(100, 3.0)

    def tpot_p50(perf):
        recs = Simulator(small_config, sim_setup(small_config, perf, Budget(2, 2))).run(prompts, outputs, arrivals)
        tp = sorted(r.tpot_s for r in recs if r.ok)
        return tp[len(tp) // 2]
    assert tpot_p50(replace(small_perf, overhead_s={"decode_admission": 0.05})) > tpot_p50(small_perf) + 0.002
