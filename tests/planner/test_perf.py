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
