"""The channel probe moves a real request through sender -> receiver -> staging."""

import pytest
import torch

from kvtransfer.channel_probe import measure_channel


@pytest.mark.parametrize("level,in_flight", [("raw", 1), ("int8", 1), ("raw", 3)])
def test_probe_lands_every_layer_and_reports_raw_bytes(level, in_flight):
    r = measure_channel(num_layers=3, num_kv_heads=2, head_dim=8, num_tokens=40, dtype=torch.float32,
                        level=level, repeats=2, timeout_s=20, in_flight=in_flight)
    assert r.level == level and r.num_tokens == 40 and r.in_flight == in_flight
    assert r.bytes_per_s * r.per_request_s == pytest.approx(2 * 3 * 40 * 2 * 8 * 4)


def test_probe_names_a_channel_that_fails():
    with pytest.raises(Exception, match="level|codec|unknown"):
        measure_channel(num_layers=1, num_kv_heads=1, head_dim=4, num_tokens=4, dtype=torch.float32,
                        level="no-such-level", repeats=1, timeout_s=5)
