"""TP > 1 step times measured with one process per rank (gloo on CPU)."""

import pytest

from cluster.config import parse_cluster_config
from planner.latency import fit_step_model
from planner.profile_command import tp_sizes_to_profile
from planner.tp_profile import profile_tp


def _config():
    return parse_cluster_config({
        "model": {"name": "tiny-gqa", "weights": "dummy"}, "device": "cpu",
        "prefill": {"instances": 1, "max_batch_tokens": 256}, "decode": {"instances": 1, "max_batch_size": 4},
        "slo": {"ttft_s": 1.0, "tpot_s": 0.1}})


def test_tp2_profile_has_the_tp1_points_and_fits():
    entry = profile_tp(_config(), 2, quick=True, timeout_s=240, log=lambda line: None)
    assert {p["length"] for p in entry["prefill"]} >= {16, 64, 256}
    assert {p["batch"] for p in entry["decode"]} >= {1, 4}
    assert all(p["time_s"] > 0 for p in entry["prefill"] + entry["decode"])
    model = fit_step_model(2, entry["prefill"], entry["decode"])
    assert model.prefill.source == "profile" and model.decode.coef[0] >= 0


def test_tp_sizes_are_checked_against_the_model():
    cfg = _config()
    assert tp_sizes_to_profile(cfg, "2,4") == (1, 2, 4)
    with pytest.raises(Exception, match="--tp-sizes"):
        tp_sizes_to_profile(cfg, "3")
    with pytest.raises(ValueError, match="--tp-sizes"):
        tp_sizes_to_profile(cfg, "two")


def test_channel_link_is_fitted_from_two_probe_sizes():
    import torch

    from engine.presets import get_preset
    from planner.profile import channel_link, fit_link
    link = channel_link(get_preset("tiny-gqa"), torch.float32, "cpu", 1024, copy_bytes_per_s=None)
    # busy (4 queued back to back) and alone, at two sizes each
    assert [(p["num_tokens"], p["in_flight"]) for p in link["probe"]] == [(256, 4), (1024, 4), (256, 1), (1024, 1)]
    assert link["bytes_per_s"] > 0 and link["per_run_s"] >= 0 and link["latency_s"] >= 0
    # 1 ms per message + 1 GB/s; a 10 GB/s copy inside the probe comes out of the wire rate
    fit = fit_link([(1e6, 0.002), (9e6, 0.010)], None)
    assert fit["bytes_per_s"] == pytest.approx(1e9) and fit["per_run_s"] == pytest.approx(1e-3)
    fit = fit_link([(1e6, 0.002), (9e6, 0.010)], 10e9)
    assert fit["bytes_per_s"] == pytest.approx(1 / (1e-9 - 1e-10))
