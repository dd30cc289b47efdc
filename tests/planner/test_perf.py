"""Building the planner's performance view from a profile."""

import pytest

from planner.perf import calibrate_link
from planner.transfer import LinkModel, TransferModel


def test_the_channel_is_slowed_to_what_the_running_cluster_measured():
    transfer = TransferModel(kv_bytes_per_token=131072, num_layers=32)
    probe = LinkModel("tcp", 4e9, 2.5e-4)
    tokens = 132
    modeled = transfer.total_time(tokens, "raw", probe)
    notes: list[str] = []
    served = {"raw_bytes": tokens * 131072, "served_s": 8 * modeled}
    slow = calibrate_link(probe, transfer, served, notes)
    assert transfer.total_time(tokens, "raw", slow) == pytest.approx(8 * modeled, rel=0.01)
    assert notes and "x8.00" in notes[0]
    # a cluster as fast as the probe (or faster) leaves the probe alone
    assert calibrate_link(probe, transfer, {**served, "served_s": modeled}, []) is probe


def test_an_admission_is_timed_only_while_the_batch_still_decodes():
    from planner.latency import LinearFit, StepModel
    from planner.overhead import admission_gaps
    model = StepModel(1, LinearFit((0.01, 0.0, 0.0)), LinearFit((0.005, 0.0, 0.0)))   # 5 ms a decode step
    steps = {0.000: 8, 0.005: 8, 0.010: 8, 0.017: 9, 0.022: 8, 0.027: 8,   # a joiner admitted in 7 ms
             0.600: 1, 0.605: 1}                                          # the batch ended; a late joiner
    admitting, plain = admission_gaps(steps, [0.015, 0.550], batch=8, prompt_len=16, model=model)
    assert admitting == pytest.approx([0.002])          # not the 573 ms idle gap before the late joiner
    assert plain == pytest.approx([0.0, 0.0, 0.0])


def test_the_channel_sends_what_is_ready_as_one_run():
    from planner.transfer import schedule_runs
    # all ready: one run, one fixed cost
    assert schedule_runs([0.0] * 4, 0.0, 1.0, 0.1, 0.5, 0.01) == pytest.approx((1.4, 1.94))
    # layers ready one by one, slower than the channel: a run each, streaming behind compute
    sender, landed = schedule_runs([1.0, 2.0, 3.0], 0.0, 0.1, 0.1, 0.0, 0.0)
    assert (sender, landed) == pytest.approx((3.2, 3.2))
    # a busy channel (free at 2.5) takes the three layers ready by then as one run, then the last
    sender, _ = schedule_runs([1.0, 1.5, 2.0, 4.0], 2.5, 1.0, 0.1, 0.0, 0.0)
    assert sender == pytest.approx(max(2.5 + 1.0 + 0.3, 4.0) + 1.1)


def test_codec_costs_come_per_run_in_new_profiles_and_per_layer_in_old_ones():
    from planner.transfer import LinkModel, TransferModel
    link = LinkModel("tcp", 1e9, per_run_s=1e-3)
    new = TransferModel(1000, 8, encode_bytes_per_s={"int8": 1e9}, decode_bytes_per_s={"int8": 1e9},
                        encode_per_run_s={"int8": 2e-3}, decode_per_run_s={"int8": 3e-3}, bits_per_element={"int8": 8})
    old = TransferModel(1000, 8, encode_bytes_per_s={"int8": 1e9}, decode_bytes_per_s={"int8": 1e9},
                        encode_per_layer_s={"int8": 2e-3}, decode_per_layer_s={"int8": 3e-3}, bits_per_element={"int8": 8})
    assert new.run_times("int8", link) == pytest.approx((3e-3, 3e-3))
    assert new.run_times("raw", link) == pytest.approx((1e-3, 0.0))
    # the whole request as one run: the fixed costs once, not once per layer
    assert old.total_time(100, "int8", link) - new.total_time(100, "int8", link) == pytest.approx(7 * 5e-3)
