import pytest

from engine.presets import get_preset
from engine.request import Request, SamplingParams
from engine.scheduler import ScheduledBatch, ScheduledSeq
from planner.hardware import ACCELERATORS, kv_blocks_per_instance, roofline_step_model, tp_sizes
from planner.latency import derive_tp, fit_linear, fit_step_model


def test_fit_recovers_synthetic_coefficients():
    a, b, c = 0.004, 2e-5, 3e-9
    pts = [(n, n * n, a + b * n + c * n * n) for n in (16, 64, 128, 256, 512, 1024, 2048)]
    fit = fit_linear(pts)
    assert fit.coef[0] == pytest.approx(a, rel=1e-6)
    assert fit.coef[1] == pytest.approx(b, rel=1e-6)
    assert fit.coef[2] == pytest.approx(c, rel=1e-5)
    assert fit.mean_rel_err < 1e-9
    assert fit.hi == (2048, 2048 * 2048)


def test_fit_keeps_coefficients_nonnegative():
    # noisy points whose unconstrained fit wants a negative quadratic term
    pts = [(n, n * n, 0.01 + 1e-4 * n - 1e-9 * n * n) for n in (10, 100, 500, 1000, 2000)]
    fit = fit_linear(pts)
    assert min(fit.coef) >= 0
    assert fit.mean_rel_err < 0.1


def test_extrapolation_is_flagged():
    rows_p = [{"num_tokens": n, "attn": n * n, "time_s": 0.01 + 1e-4 * n} for n in (32, 128, 512)]
    rows_d = [{"batch": b, "sum_context": b * 100, "time_s": 0.02 + 1e-3 * b} for b in (1, 4, 16)]
    m = fit_step_model(1, rows_p, rows_d)
    req = Request("r", [1] * 4000, SamplingParams(max_tokens=4), 0.0)
    batch = ScheduledBatch(prefills=[ScheduledSeq(req, 4000, 0)])
    t = m.step_time(batch)
    assert t == pytest.approx(0.01 + 1e-4 * 4000, rel=1e-3)
    assert m.extrapolations == 1
    small = ScheduledBatch(prefills=[ScheduledSeq(Request("s", [1] * 100, SamplingParams(), 0.0), 100, 0)])
    m.step_time(small)
    assert m.extrapolations == 1


def test_mixed_step_counts_one_constant():
    rows_p = [{"num_tokens": n, "attn": n * n, "time_s": 0.01 + 1e-4 * n} for n in (32, 128, 512)]
    rows_d = [{"batch": b, "sum_context": b * c, "time_s": 0.02 + 1e-3 * b} for b in (1, 4, 16) for c in (50, 400)]
    m = fit_step_model(1, rows_p, rows_d)
    p = Request("p", [1] * 100, SamplingParams(), 0.0)
    d = Request("d", [1] * 50, SamplingParams(), 0.0)
    mixed = ScheduledBatch(prefills=[ScheduledSeq(p, 100, 0)], decodes=[ScheduledSeq(d, 1, 50)])
    assert m.step_time(mixed) == pytest.approx(0.01 + 1e-2 + 0.02 + 1e-3 - 0.01, rel=1e-2)


def test_roofline_and_tp_scaling_are_sane():
    model = get_preset("llama-3-8b")
    h100 = ACCELERATORS["h100"]
    r1, r2 = roofline_step_model(model, 1, h100), roofline_step_model(model, 2, h100)
    # decode at batch 1 is weight-bandwidth bound: 16 GB / (3.35 TB/s * eff) ~ 5-10 ms
    assert 0.004 < r1.decode_time(1, 512) < 0.02
    assert r2.decode_time(1, 512) < r1.decode_time(1, 512)
    # prefill of 2k tokens on one H100: tens of ms
    assert 0.01 < r1.prefill_time(2048, 2048 ** 2) < 0.1
    d4 = derive_tp(r1, 4)
    assert d4.prefill.source == "derived" and r1.prefill.coef[1] / 4 < d4.prefill.coef[1] < r1.prefill.coef[1] / 2
    assert tp_sizes(model, 8) == [1, 2, 4, 8]
    assert tp_sizes(get_preset("smollm2-135m"), 8) == [1]  # 3 KV heads split only one way
    assert kv_blocks_per_instance(model, 2, h100, "bfloat16", 16) > kv_blocks_per_instance(model, 1, h100, "bfloat16", 16)


def test_decode_grid_follows_a_step_time_concave_in_batch():
    from planner.latency import DecodeGrid, StepModel, fit_decode
    # 50 ms + 20 ms * sqrt(batch) + 30 us per context token: concave in batch, as on a CPU
    def t(ctx, b):
        return 0.05 + 0.02 * b ** 0.5 + 3e-5 * ctx
    pts = [(b * c, b, t(b * c, b)) for b in (1, 4, 16, 32) for c in (64, 256, 1024)]
    fit = fit_decode(pts)
    assert isinstance(fit, DecodeGrid) and fit.mean_rel_err < fit.plane.mean_rel_err
    for b, c in ((2, 100), (8, 300), (24, 700)):
        assert abs(fit(b * c, b) - t(b * c, b)) / t(b * c, b) < 0.05
    model = StepModel(1, fit.plane, fit)
    again = StepModel.from_json(model.to_json())
    assert again.decode_time(8, 2400) == pytest.approx(model.decode_time(8, 2400))
    # one batch size only: nothing to interpolate, the plane stays
    assert not isinstance(fit_decode([(c, 4, t(c, 4)) for c in (64, 256, 1024)]), DecodeGrid)
