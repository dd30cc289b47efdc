"""Codec kernels (scales, quantize + histogram, tables, rANS encode/compaction/decode, fused
dequantize) give the CPU reference's bytes and values. Small sizes run under TRITON_INTERPRET=1
on CPU; the full-size check is GPU-only."""

import dataclasses

import numpy as np
import pytest
import torch

from kvtransfer.codec import CodecError, KVDecoder, KVEncoder, ModelFingerprint, get_level
from kvtransfer.codec.format import frame_section


def _encoder(kv: torch.Tensor, level, token_start: int = 0, seq_len: int | None = None) -> KVEncoder:
    nl, _, t, hh, d = kv.shape
    fp = ModelFingerprint(nl, hh, d, str(kv.dtype).replace("torch.", ""))
    return KVEncoder(fp, level, token_start=token_start, num_tokens=t, seq_len=seq_len)


def _same_bytes(kv: torch.Tensor, level, token_start: int = 0, seq_len: int | None = None) -> None:
    from kvtransfer.codec import gpu
    enc = _encoder(kv, level, token_start, seq_len)
    nl = kv.shape[0]
    ref = enc.encode_layers([(i, kv[i, 0].cpu(), kv[i, 1].cpu()) for i in range(nl)])
    de = gpu.encode_device(enc.h, kv)
    assert [frame_section(p) for p in gpu.payloads(enc.h, kv, de)] == ref
    if de.n:
        assert torch.equal(gpu.decode_device(enc.h, de), de.syms)
    if enc.h.level.kind == "quant" and de.n:  # fused decode + dequantize = the CPU decoder's values
        vals = gpu.decode_full(enc.h, de, kv.dtype).cpu()
        dec = KVDecoder(enc.header())
        got = [dec.decode_layer(s) for s in ref]
        want = torch.stack([torch.stack([k, v]) for k, v in got])[:, :, de.lo:de.hi].reshape(2 * nl, -1)
        esc = de.syms.cpu() == 2 * enc.h.level.max_q + 1
        assert torch.equal(vals[~esc].view(INT[kv.dtype]),
                           want[~esc].view(INT[kv.dtype]))


INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


@pytest.mark.parametrize("dtype,level,t", [(torch.float16, "default", 37), (torch.bfloat16, "aggressive", 20),
                                           (torch.float32, "int8", 9), (torch.bfloat16, "lossless", 33)])
def test_kernels_match_reference_bytes(device, dtype, level, t):
    kv = (torch.randn(2, 2, t, 2, 8) * torch.linspace(0.1, 4, 8)).to(dtype).to(device)
    kv[0, 0, 5, 1, 3] = 500.0  # an escape
    _same_bytes(kv, level, token_start=3, seq_len=t + 10)


def test_awkward_shapes_many_lane_groups(device):
    # 3 heads x 6 dims (padded tiles), short lanes (many groups, a partial last step), per-channel
    # key scales, zero rows, subnormal-range values and > 32 octaves between rows (saturated offsets)
    lvl = dataclasses.replace(get_level("default"), name="t", lane_len=3, k_scale="channel")
    kv = torch.randn(3, 2, 23, 3, 6)
    kv[1, 1, 7] = 0.0
    kv[2, 1, 9] *= 1e-39
    kv[2, 1, 10] *= 1e12
    kv[0, 0, :, 2, 4] *= 1e-30
    _same_bytes(kv.to(device), lvl, token_start=0, seq_len=40)
    kv[2, 1, 10] *= 1e-8                                    # fp16 range
    _same_bytes(kv.half().to(device), dataclasses.replace(get_level("int8"), name="u", lane_len=5),
                token_start=2, seq_len=25)


def test_all_tokens_exact_and_nonfinite(device):
    from kvtransfer.codec import gpu
    kv = torch.randn(2, 2, 3, 2, 4).to(device)
    _same_bytes(kv, "default", token_start=0, seq_len=3)   # 4 sink tokens cover the chunk
    kv[1, 1, 2, 0, 1] = float("nan")
    enc = _encoder(kv, "default", token_start=0, seq_len=40)
    with pytest.raises(CodecError, match="inf/NaN"):
        gpu.payloads(enc.h, kv, gpu.encode_device(enc.h, kv))


def test_corrupt_words_raise(device):
    from kvtransfer.codec import gpu
    kv = torch.randn(1, 2, 40, 2, 8).to(device)
    enc = _encoder(kv, "default", token_start=10, seq_len=100)
    de = gpu.encode_device(enc.h, kv)
    total = int(de.counts.sum())
    de.words[:total] = de.words[:total].flip(0)
    with pytest.raises(CodecError, match="cleanly"):
        gpu.decode_full(enc.h, de, kv.dtype)


def test_encoder_uses_device_path_for_device_tensors(device, monkeypatch):
    from kvtransfer.codec import gpu
    if device.type != "cuda":
        monkeypatch.setattr(gpu, "on_device", lambda x: True)
    kv = torch.randn(4, 2, 30, 2, 8)
    enc = _encoder(kv, "default", token_start=0, seq_len=30)
    want = [enc.encode_layer(i, kv[i, 0], kv[i, 1]) for i in (2, 0)]
    calls = []
    real = gpu.encode_device
    monkeypatch.setattr(gpu, "encode_device", lambda *a, **k: calls.append(1) or real(*a, **k))
    kvd = kv.to(device)
    assert [enc.encode_layer(i, kvd[i, 0], kvd[i, 1]) for i in (2, 0)] == want
    assert calls


def test_dequantize_kernel_matches_reference(device):
    from kernels.codec_symbols import dequantize
    from kvtransfer.codec import quant
    syms = torch.randint(0, 64, (3, 100), dtype=torch.uint8)
    step = torch.rand(3, 10) * 1e3
    got = dequantize(syms.to(device), step.to(device), 10, 10, 31, torch.float16).cpu()
    ref = quant.dequantize(syms.numpy(), np.repeat(step.numpy(), 10, axis=1), 31)
    ref = torch.from_numpy(np.clip(ref, -65504, 65504)).to(torch.float16)
    assert torch.equal(got, ref)


def test_division_magic_is_exact():
    # the encoder's reciprocal multiply, checked exhaustively over frequencies, on edge states
    f = np.arange(1, 16385, dtype=np.uint64)
    lg = np.ceil(np.log2(f.astype(np.float64))).astype(np.uint64)
    magic = (((np.uint64(1) << lg) - f) << np.uint64(32)) // f + np.uint64(1)
    for x in (np.uint64(65536), np.uint64(2**32 - 1), np.uint64(2**31 + 12345), np.uint64(3 * 2**20 + 7)):
        xs = np.minimum(x, (f << np.uint64(18)) - np.uint64(1))
        t = (xs * magic) >> np.uint64(32)
        q = (t + ((xs - t) >> np.minimum(lg, np.uint64(1)))) >> (np.maximum(lg, np.uint64(1)) - np.uint64(1))
        assert np.array_equal(q, xs // f)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [256, 2048])
def test_full_size_llama_chunk_same_bytes(t):
    kv = (torch.randn(32, 2, t, 8, 128, device="cuda") * torch.linspace(0.1, 4, 128, device="cuda")).bfloat16()
    _same_bytes(kv, "default", token_start=0, seq_len=t)
