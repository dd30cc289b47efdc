"""Property tests over awkward shapes: 1 token, sizes off every block multiple, constant channels."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtransfer.codec import CodecError, decode_request, encode_request

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@st.composite
def kv_layers(draw):
    num_layers = draw(st.integers(1, 3))
    t = draw(st.integers(1, 70))
    h = draw(st.integers(1, 3))
    d = draw(st.sampled_from([1, 3, 8, 17]))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    seed = draw(st.integers(0, 2**31 - 1))
    style = draw(st.sampled_from(["normal", "constant_channel", "zeros", "tiny", "huge"]))
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(num_layers):
        kv = []
        for _ in range(2):
            x = torch.randn(t, h, d, generator=g)
            if style == "constant_channel":
                x[:, :, 0] = 1.5
            elif style == "zeros":
                x.zero_()
            elif style == "tiny":
                x *= 1e-6
            elif style == "huge":
                x *= 2e3 if dtype == torch.float16 else 1e30
            kv.append(x.to(dtype))
        layers.append(tuple(kv))
    return layers, draw(st.integers(0, 5000))


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(kv_layers(), st.sampled_from(["lossless", "raw"]))
def test_lossless_bit_exact_on_any_shape(case, level):
    layers, start = case
    h, got = decode_request(encode_request(layers, level, token_start=start))
    assert (h.token_start, h.token_end) == (start, start + layers[0][0].shape[0])
    for (k, v), (k2, v2) in zip(layers, got):
        assert torch.equal(k.view(torch.uint8), k2.view(torch.uint8))
        assert torch.equal(v.view(torch.uint8), v2.view(torch.uint8))


@SETTINGS
@given(kv_layers(), st.sampled_from(["int8", "default", "aggressive", "cachegen256"]))
def test_lossy_round_trip_on_any_shape(case, level):
    layers, start = case
    h, got = decode_request(encode_request(layers, level, token_start=start))
    for (k, v), (k2, v2) in zip(layers, got):
        for a, b in ((k, k2), (v, v2)):
            assert b.shape == a.shape and b.dtype == a.dtype
            assert bool(torch.isfinite(b).all())
            a32, b32 = a.float(), b.float()
            # error per head bounded by the head's magnitude (steps are a fraction of a scale)
            bound = 4.0 * a32.abs().amax(dim=(0, 2), keepdim=True) + 1e-30
            assert bool(((a32 - b32).abs() <= bound).all())
            if a32.abs().max() > 0 and level == "int8":
                rel = (a32 - b32).abs().max() / a32.abs().max()
                assert rel < 0.05


@SETTINGS
@given(kv_layers(), st.sampled_from([float("nan"), float("inf"), float("-inf")]))
def test_non_finite_rejected_for_lossy(case, bad):
    layers, _ = case
    k = layers[-1][0].clone()
    k.view(-1)[k.numel() // 2] = bad
    layers[-1] = (k, layers[-1][1])
    with pytest.raises(CodecError, match="inf/NaN"):
        encode_request(layers, "default")
    _, got = decode_request(encode_request(layers, "lossless"))
    assert torch.equal(got[-1][0].view(torch.uint8), k.view(torch.uint8))


def test_single_token_and_all_exact_chunks():
    k = torch.randn(1, 2, 8, dtype=torch.float16)
    for start in (0, 10):  # token 0 is a sink (sent exact); token 10 is quantized
        _, got = decode_request(encode_request([(k, k)], "default", token_start=start, seq_len=1000))
        assert got[0][0].shape == k.shape
        if start == 0:
            assert torch.equal(got[0][0], k)
    assert np.isfinite(got[0][0].float().numpy()).all()
