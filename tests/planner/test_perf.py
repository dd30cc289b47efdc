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
