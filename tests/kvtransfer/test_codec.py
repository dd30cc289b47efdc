"""Stream format, levels and error handling of the KV codec."""

import struct
import zlib

import msgpack
import numpy as np
import pytest
import torch

from kvtransfer.codec import (CodecError, KVDecoder, KVEncoder, ModelFingerprint, bits_per_element, decode_request,
                              encode_request, get_level, level_for_bits, level_names, split_stream)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _kv(num_layers=3, t=40, h=2, d=16, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_layers):
        # keys with outlier channels and a sink token, values plain: the shape of real KV
        k = torch.randn(t, h, d, generator=g) * (1 + 4 * (torch.arange(d) % 7 == 0))
        k[0] *= 20
        out.append((k.to(dtype), torch.randn(t, h, d, generator=g).to(dtype)))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", ["raw", "lossless", "zstd"])
def test_lossless_levels_are_bit_exact(dtype, level):
    layers = _kv(dtype=dtype)
    layers[1][0][3, 1, 2] = float("nan")
    layers[2][1][5, 0, 0] = float("-inf")
    _, got = decode_request(encode_request(layers, level))
    for (k, v), (k2, v2) in zip(layers, got):
        assert k2.dtype == dtype and k2.shape == k.shape
        assert torch.equal(k.view(torch.uint8), k2.view(torch.uint8))
        assert torch.equal(v.view(torch.uint8), v2.view(torch.uint8))


def test_lossless_compresses_bf16_kv():
    layers = _kv(t=256, h=4, d=64, dtype=torch.bfloat16)
    s = encode_request(layers, "lossless")
    assert bits_per_element(len(s), 3, 256, 4, 64) < 14.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level,max_rel", [("int8", 0.02), ("default", 0.45), ("aggressive", 0.9),
                                           ("cachegen256", 0.2)])
def test_lossy_levels_bound_error_and_keep_exact_tokens(dtype, level, max_rel):
    layers = _kv(t=64, dtype=dtype)
    h, got = decode_request(encode_request(layers, level, seq_len=64))
    cfg = get_level(level)
    for (k, v), (k2, v2) in zip(layers, got):
        for a, b in ((k, k2), (v, v2)):
            err = (a.float() - b.float()).abs().max() / a.float().abs().max()
            assert err <= max_rel, (level, float(err))
            if cfg.num_sink:
                assert torch.equal(a[:cfg.num_sink], b[:cfg.num_sink])
            if cfg.num_recent:
                assert torch.equal(a[-cfg.num_recent:], b[-cfg.num_recent:])


def test_outliers_are_escaped_and_sent_exact():
    k, v = _kv(num_layers=1, t=64)[0]
    k[30, 1, 5] = 3000.0
    _, got = decode_request(encode_request([(k, v)], "default"))
    assert got[0][0][30, 1, 5].item() == 3000.0


def test_lossy_levels_meet_their_size_on_kv_like_data():
    layers = _kv(num_layers=2, t=512, h=4, d=64)
    for level in ("default", "aggressive"):
        s = encode_request(layers, level)
        assert bits_per_element(len(s), 2, 512, 4, 64) < {"default": 5.0, "aggressive": 3.5}[level]


def test_layers_decode_independently_and_in_any_order():
    layers = _kv()
    fp = ModelFingerprint(3, 2, 16, "float16")
    enc = KVEncoder(fp, "default", token_start=100, num_tokens=40, seq_len=500)
    secs = [enc.encode_layer(i, k, v) for i, (k, v) in enumerate(layers)]
    dec = KVDecoder(enc.header(), expect=fp)
    for i in (2, 0, 1):
        layer, k, v = dec.decode_layer_indexed(secs[i])
        assert layer == i
        ref = KVDecoder(enc.header()).decode_layers_indexed(secs)[i]
        assert torch.equal(k, ref[1]) and torch.equal(v, ref[2])
    # a batch-encoded layer is byte-identical to a singly encoded one
    assert enc.encode_layers([(1, *layers[1])])[0] == secs[1]


def test_header_carries_fingerprint_range_and_params():
    layers = _kv()
    s = encode_request(layers, "default", token_start=0, seq_len=40)
    header, _, sections = split_stream(s)
    assert header.model == ModelFingerprint(3, 2, 16, "float16")
    assert (header.token_start, header.token_end, header.seq_len) == (0, 40, 40)
    assert header.level == get_level("default") and len(sections) == 3
    body = s[12:12 + struct.unpack_from("<I", s, 4)[0]]
    raw = msgpack.unpackb(body)
    assert raw["magic"] == "SSKV" and raw["version"] == 1 and raw["params"]["alpha_k"] == get_level("default").alpha_k


def _flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0x10
    return bytes(b)


@pytest.mark.parametrize("level", ["lossless", "default"])
def test_corruption_and_truncation_raise_codec_error(level):
    s = encode_request(_kv(), level)
    with pytest.raises(CodecError, match="magic"):
        decode_request(b"XXXX" + s[4:])
    with pytest.raises(CodecError, match="header CRC32"):
        decode_request(_flip(s, 20))
    with pytest.raises(CodecError, match="CRC32"):
        decode_request(_flip(s, len(s) - 7))
    with pytest.raises(CodecError, match="truncated"):
        decode_request(s[:-3])
    header, hbytes, secs = split_stream(s)
    with pytest.raises(CodecError, match="missing"):
        decode_request(hbytes + secs[0] + secs[2])
    with pytest.raises(CodecError, match="twice"):
        decode_request(hbytes + secs[0] + secs[0] + secs[1] + secs[2])
    assert issubclass(CodecError, ValueError)


def test_payload_tampering_behind_a_valid_crc_is_caught():
    s = encode_request(_kv(t=300), "default")
    _, hbytes, secs = split_stream(s)
    payload = msgpack.unpackb(secs[0][10:])
    assert "rans" in payload["k"]["seg"]
    words = bytearray(payload["k"]["seg"]["rans"][2])
    words[len(words) // 2] ^= 0xFF
    payload["k"]["seg"]["rans"][2] = bytes(words)
    body = msgpack.packb(payload, use_bin_type=True)
    forged = b"LY" + struct.pack("<II", len(body), zlib.crc32(body)) + body
    with pytest.raises(CodecError):
        KVDecoder(hbytes).decode_layer(forged)


def test_mismatches_are_named():
    layers = _kv()
    s = encode_request(layers, "default")
    with pytest.raises(CodecError, match="expects"):
        decode_request(s, expect=ModelFingerprint(3, 2, 16, "bfloat16"))
    enc = KVEncoder(ModelFingerprint(3, 2, 16, "float16"), "int8", num_tokens=40)
    with pytest.raises(CodecError, match="shape"):
        enc.encode_layer(0, layers[0][0][:5], layers[0][1][:5])
    with pytest.raises(CodecError, match="dtype"):
        enc.encode_layer(0, layers[0][0].float(), layers[0][1].float())
    with pytest.raises(CodecError, match="layer index"):
        enc.encode_layer(3, *layers[0])
    with pytest.raises(CodecError, match="unknown codec level"):
        get_level("int3")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_lossy_levels_reject_non_finite(bad):
    layers = _kv()
    layers[1][1][2, 0, 3] = bad
    with pytest.raises(CodecError, match="layer 1 V contains inf/NaN"):
        encode_request(layers, "default")


def test_registry_and_bits_selection():
    for name in ("raw", "lossless", "int8", "default", "aggressive", "cachegen256", "cachegen2048", "zstd"):
        assert name in level_names()
    assert level_for_bits(16) == "raw"
    assert level_for_bits(3.5) == "default"
    assert level_for_bits(2.5) == "aggressive"
    with pytest.raises(CodecError):
        level_for_bits(0.5)
    assert get_level("default").expected_bits <= 3.5 and get_level("aggressive").expected_bits <= 2.5


def test_exact_scale_codes_are_order_free():
    from kvtransfer.codec import quant
    rng = np.random.default_rng(0)
    g = rng.standard_normal((7, 300)).astype(np.float32) * np.float32(1e-3)
    perm = rng.permutation(300)
    assert (quant.meanabs_codes(g) == quant.meanabs_codes(g[:, perm])).all()
    s = quant.decode_codes(quant.meanabs_codes(g))
    mean = np.abs(g).mean(1)
    assert np.all((s / mean > 0.9) & (s / mean < 1.1))


def test_values_near_the_dtype_limit_stay_finite():
    k = torch.tensor([[[46240.0, -8800.0, -65376.0]]] * 20, dtype=torch.float16)
    for level in ("int8", "default", "aggressive"):
        _, got = decode_request(encode_request([(k, k)], level, token_start=50))
        assert bool(torch.isfinite(got[0][0]).all()) and bool(torch.isfinite(got[0][1]).all())
