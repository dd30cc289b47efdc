"""Device decode of received layer sections (kvtransfer/codec/device_decode.py, the receiver's
path): the same tensors as the CPU decoder, bit for bit, and clear errors on corrupt sections.
Small sizes run under TRITON_INTERPRET=1 on CPU; the full-size check is GPU-only."""

import dataclasses

import pytest
import torch

from kvtransfer.codec import CodecError, KVDecoder, KVEncoder, ModelFingerprint, get_level
from kvtransfer.codec.format import frame_section, parse_section
from kvtransfer.payload import LayerPacker, LayerUnpacker, layout_of

INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


@pytest.fixture(autouse=True)
def _kernels_decode_on_cpu(request, monkeypatch):
    """On CPU the decoders given a device run the kernels interpreted (production: CUDA only)."""
    if "device" in request.fixturenames and request.getfixturevalue("device").type == "cpu":
        from kvtransfer.codec import gpu
        monkeypatch.setattr(gpu, "decodes_on", lambda device: True)


def _encoder(kv: torch.Tensor, level, token_start: int = 0, seq_len: int | None = None) -> KVEncoder:
    nl, _, t, hh, d = kv.shape
    fp = ModelFingerprint(nl, hh, d, str(kv.dtype).replace("torch.", ""))
    return KVEncoder(fp, level, token_start=token_start, num_tokens=t, seq_len=seq_len)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.cpu().view(INT[a.dtype]), b.cpu().view(INT[b.dtype]))


def _check_round_trip(kv: torch.Tensor, level, device, token_start: int = 0, seq_len: int | None = None) -> list:
    enc = _encoder(kv, level, token_start, seq_len)
    secs = enc.encode_layers([(i, kv[i, 0], kv[i, 1]) for i in range(kv.shape[0])])
    want = KVDecoder(enc.header()).decode_layers_indexed(secs)
    dec = KVDecoder(enc.header(), device=device)
    assert dec.device is not None            # the kernels decode
    for got in (dec.decode_layers_indexed(secs), [dec.decode_layer_indexed(s) for s in reversed(secs)][::-1]):
        for (i, k, v), (j, k2, v2) in zip(want, got):
            assert i == j and k2.device.type == device.type
            assert _same(k, k2) and _same(v, v2)
    return secs


@pytest.mark.parametrize("dtype,level,t,start,seq", [
    (torch.float16, "default", 37, 3, 47), (torch.bfloat16, "aggressive", 20, 0, 20),
    (torch.float32, "int8", 9, 0, 9), (torch.bfloat16, "lossless", 33, 0, 33),
    (torch.float16, "default", 3, 0, 3)])    # every token exact (sinks)
def test_device_decode_matches_cpu_decoder(device, dtype, level, t, start, seq):
    kv = torch.randn(2, 2, t, 2, 8) * torch.linspace(0.1, 4, 8)
    kv[0, 0, min(5, t - 1), 1, 3] = 500.0   # an escape
    _check_round_trip(kv.to(dtype), level, device, start, seq)


def test_short_lanes_channel_scales_and_stored_segments(device):
    lvl = dataclasses.replace(get_level("default"), name="t", lane_len=3, k_scale="channel")
    kv = torch.randn(3, 2, 23, 3, 6)
    kv[2, 1, 9] *= 1e12
    _check_round_trip(kv, lvl, device, 0, 40)
    # a tiny chunk whose K is coded and V is stored raw: symbols + dequantize, then escapes
    kv = torch.randn(1, 2, 30, 2, 8)
    kv[0, 0] = 0.0
    kv[0, 1, 2, 1, 1] = 1e4
    fine_v = dataclasses.replace(get_level("default"), name="t2", alpha_v=0.1)
    secs = _check_round_trip(kv, fine_v, device, 10, 100)
    p = parse_section(secs[0])
    assert "rans" in p["k"]["seg"] and "stored" in p["v"]["seg"]


def _reframe(section: bytes, edit) -> bytes:
    p = parse_section(section)
    edit(p)
    return frame_section(p)


def test_corrupt_sections_raise(device):
    kv = torch.randn(1, 2, 120, 2, 8)
    kv[0, 0, 20, 0, 0] = 300.0
    enc = _encoder(kv, "default", 10, 200)
    sec = enc.encode_layer(0, kv[0, 0], kv[0, 1])
    dec = KVDecoder(enc.header(), device=device)

    def flip_words(p):
        w = p["k"]["seg"]["rans"][2]
        p["k"]["seg"]["rans"][2] = w[::-1]

    def drop_escape(p):
        p["k"]["esc_idx"], p["k"]["esc_val"] = b"", b""

    def move_escape(p):
        assert len(p["k"]["esc_idx"]) >= 4    # keys share a scale per head: the outlier escapes
        i = int.from_bytes(p["k"]["esc_idx"][:4], "little")
        p["k"]["esc_idx"] = ((i + 1) % 1920).to_bytes(4, "little") + p["k"]["esc_idx"][4:]

    for edit, match in ((flip_words, "corrupt"), (drop_escape, "corrupt"), (move_escape, "corrupt")):
        with pytest.raises(CodecError, match=match):
            dec.decode_layer(_reframe(sec, edit))
    bad = bytearray(sec)
    bad[-3] ^= 1
    with pytest.raises(CodecError, match="CRC32"):
        dec.decode_layer(bytes(bad))
    with pytest.raises(CodecError, match="not a map"):
        dec.decode_layer(frame_section({"layer": 0, "k": 1, "v": 2}))


@pytest.mark.parametrize("level", ["raw", "default", "lossless", "cachegen"])
def test_layer_unpacker_on_a_device(device, level):
    layout = layout_of(2, 2, 8, torch.bfloat16)
    kv = (torch.randn(2, 2, 19, 2, 8) * 3).bfloat16()
    packer = LayerPacker(layout, level, 19)
    host = LayerUnpacker(layout, level, 19, packer.stream_header())
    dev = LayerUnpacker(layout, level, 19, packer.stream_header(), device=device)
    for i in range(2):
        body = bytearray(packer.pack(i, kv[i, 0], kv[i, 1]))
        (k, v), (k2, v2) = host.unpack(body), dev.unpack(body)
        assert _same(k, k2) and _same(v, v2)
        if level == "raw":
            assert _same(k2, kv[i, 0])


@pytest.mark.gpu
@pytest.mark.parametrize("t", [256, 2048])
def test_full_size_llama_layers_decode_on_the_gpu(t):
    """LayerPacker on the GPU -> LayerUnpacker(device=cuda): device tensors, equal to the CPU
    decoder's, ready on the default stream without further sync."""
    layout = layout_of(32, 8, 128, torch.bfloat16)
    kv = (torch.randn(4, 2, t, 8, 128, device="cuda") * torch.linspace(0.1, 4, 128, device="cuda")).bfloat16()
    for level in ("default", "lossless"):
        packer = LayerPacker(layout, level, t)
        host = LayerUnpacker(layout, level, t, packer.stream_header())
        dev = LayerUnpacker(layout, level, t, packer.stream_header(), device="cuda")
        for i in (0, 3, 31):
            body = bytearray(packer.pack(i, kv[i % 4, 0], kv[i % 4, 1]))
            k2, v2 = dev.unpack(body)
            assert k2.is_cuda and v2.is_cuda
            k, v = host.unpack(body)
            assert _same(k, k2) and _same(v, v2)
