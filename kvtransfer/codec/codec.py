"""KVEncoder / KVDecoder: a header, then layer sections that decode independently.

    enc = KVEncoder(fingerprint, "default", token_start=0, num_tokens=T, seq_len=T)
    wire = [enc.header()] + [enc.encode_layer(i, k_i, v_i) for i in range(num_layers)]
    dec = KVDecoder(wire[0], expect=fingerprint)
    k_i, v_i = dec.decode_layer(wire[1 + i])        # any order, as sections arrive

K and V are [num_tokens, num_kv_heads, head_dim] in the fingerprint's dtype. On a GPU, levels
with a device path (gpu.supports) are coded there, all given layers in the same launches, to the
same bytes as the CPU reference; everything else is coded on the CPU. A decoder given a device
(`KVDecoder(header, device=torch.device("cuda", 0))`) decodes such levels there
(device_decode.py), to the same tensors as the CPU decoder, on its own side stream, returning
tensors that are ready to use on any stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch

from kvtransfer.codec import gpu
from kvtransfer.codec.errors import CodecError
from kvtransfer.codec.format import (ModelFingerprint, StreamHeader, dtype_name, frame_section, parse_header,
                                     parse_section, split_stream)
from kvtransfer.codec.layer_codec import LAYER_CODECS
from kvtransfer.codec.levels import LevelConfig, get_level

Tensor = torch.Tensor
Section = bytes | bytearray | memoryview


class KVEncoder:
    """Encodes one request's token range [token_start, token_start + num_tokens) at one level."""

    def __init__(self, model: ModelFingerprint, level: str | LevelConfig, *, token_start: int = 0,
                 num_tokens: int, seq_len: int | None = None) -> None:
        if num_tokens < 1 or token_start < 0:
            raise CodecError(f"token range must be non-empty and start >= 0, got start={token_start} "
                             f"num_tokens={num_tokens}")
        end = token_start + num_tokens
        self.h = StreamHeader(model, token_start, end, end if seq_len is None else seq_len, get_level(level))
        if self.h.seq_len < end:
            raise CodecError(f"seq_len {self.h.seq_len} is before the token range's end {end}")
        self._encode = LAYER_CODECS[self.h.level.kind][0]

    def header(self) -> bytes:
        return self.h.to_bytes()

    def _check(self, layer_idx: int, k: Tensor, v: Tensor) -> None:
        m = self.h.model
        if not 0 <= layer_idx < m.num_layers:
            raise CodecError(f"layer index {layer_idx} outside [0, {m.num_layers})")
        want = (self.h.num_tokens, m.num_kv_heads, m.head_dim)
        for name, x in (("K", k), ("V", v)):
            if tuple(x.shape) != want:
                raise CodecError(f"layer {layer_idx} {name}: shape {tuple(x.shape)}, expected {want} "
                                 "[num_tokens, num_kv_heads, head_dim]")
            if dtype_name(x.dtype) != m.dtype:
                raise CodecError(f"layer {layer_idx} {name}: dtype {x.dtype}, stream is {m.dtype}")

    def encode_layers(self, layers: Sequence[tuple[int, Tensor, Tensor]]) -> list[bytes]:
        """Sections of several layers, coded as one batch (faster on CPU), each decodable alone."""
        for i, k, v in layers:
            self._check(i, k, v)
        if layers and gpu.on_device(layers[0][1]) and gpu.supports(self.h.level):
            ids = [i for i, _, _ in layers]
            dev = layers[0][1].device
            # Triton launches on the current device: make it the tensors' one
            with torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
                kv = torch.stack([torch.stack([k.detach(), v.detach()]) for _, k, v in layers])  # [L, 2, T, H, D]
                enc = gpu.encode_device(self.h, kv, layer_ids=ids)
                return [frame_section(p) for p in gpu.payloads(self.h, kv, enc, layer_ids=ids)]
        items = [(i, k.detach().cpu().contiguous(), v.detach().cpu().contiguous()) for i, k, v in layers]
        return [frame_section(p) for p in self._encode(self.h, items)]

    def encode_layer(self, layer_idx: int, k: Tensor, v: Tensor) -> bytes:
        return self.encode_layers([(layer_idx, k, v)])[0]


class KVDecoder:
    """Decodes the sections of the stream whose header it was built from."""

    def __init__(self, header: bytes, expect: ModelFingerprint | None = None,
                 device: torch.device | str | None = None) -> None:
        self.h, used = parse_header(header)
        if used != len(header):
            raise CodecError(f"header has {len(header) - used} trailing bytes")
        if expect is not None and expect != self.h.model:
            raise CodecError(f"stream is for model {self.h.model.to_dict()}, this side expects {expect.to_dict()}")
        self._decode = LAYER_CODECS[self.h.level.kind][1]
        dev = None if device is None else torch.device(device)
        self.device = dev if dev is not None and gpu.decodes_on(dev) and gpu.supports(self.h.level) else None
        if self.device is not None and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        on_cuda = self.device is not None and self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if on_cuda else None

    def decode_layers_indexed(self, sections: Sequence[Section]) -> list[tuple[int, Tensor, Tensor]]:
        payloads = [parse_section(s) for s in sections]
        for p in payloads:
            i = p["layer"]
            if not isinstance(i, int) or not 0 <= i < self.h.model.num_layers:
                raise CodecError(f"layer section names layer {i!r}, stream has {self.h.model.num_layers} layers")
            for name in ("k", "v"):
                if not isinstance(p[name], dict):
                    raise CodecError(f"layer {i} {name.upper()}: section is not a map")
        try:
            if self.device is None:
                return self._decode(self.h, payloads)
            from kvtransfer.codec.device_decode import decode_payloads
            if self._stream is None:
                return decode_payloads(self.h, payloads, self.device)
            # the stream context also makes its device current (Triton launches there); decoding
            # ends in a sync of this stream, so the tensors are ready for any other stream
            with torch.cuda.stream(self._stream):
                return decode_payloads(self.h, payloads, self.device)
        except (KeyError, TypeError, IndexError) as exc:
            raise CodecError(f"layer section malformed: {type(exc).__name__} {exc}") from exc

    def decode_layer_indexed(self, section: Section) -> tuple[int, Tensor, Tensor]:
        return self.decode_layers_indexed([section])[0]

    def decode_layer(self, section: Section) -> tuple[Tensor, Tensor]:
        _, k, v = self.decode_layer_indexed(section)
        return k, v


def fingerprint_of(layers: Sequence[tuple[Tensor, Tensor]]) -> ModelFingerprint:
    k = layers[0][0]
    if k.dim() != 3:
        raise CodecError(f"K must be [num_tokens, num_kv_heads, head_dim], got shape {tuple(k.shape)}")
    return ModelFingerprint(len(layers), int(k.shape[1]), int(k.shape[2]), dtype_name(k.dtype))


def encode_request(layers: Sequence[tuple[Tensor, Tensor]], level: str | LevelConfig, *, token_start: int = 0,
                   seq_len: int | None = None, model: ModelFingerprint | None = None) -> bytes:
    """All layers of one request (or one token chunk of it) -> one stream."""
    if not layers:
        raise CodecError("encode_request needs at least one layer")
    model = model or fingerprint_of(layers)
    if len(layers) != model.num_layers:
        raise CodecError(f"got {len(layers)} layers, fingerprint says {model.num_layers}")
    enc = KVEncoder(model, level, token_start=token_start, num_tokens=int(layers[0][0].shape[0]), seq_len=seq_len)
    return enc.header() + b"".join(enc.encode_layers([(i, k, v) for i, (k, v) in enumerate(layers)]))


def decode_request(stream: bytes, expect: ModelFingerprint | None = None) -> tuple[StreamHeader, list[tuple[Tensor, Tensor]]]:
    """One stream -> (header, [(k, v)] per layer); every layer must be present exactly once."""
    header, hbytes, sections = split_stream(stream)
    dec = KVDecoder(hbytes, expect)
    got = dec.decode_layers_indexed(sections)
    by_layer: dict[int, tuple[Tensor, Tensor]] = {}
    for i, k, v in got:
        if i in by_layer:
            raise CodecError(f"layer {i} appears twice in the stream")
        by_layer[i] = (k, v)
    missing = [i for i in range(header.model.num_layers) if i not in by_layer]
    if missing:
        raise CodecError(f"stream truncated: layers {missing[:8]}{'...' if len(missing) > 8 else ''} missing")
    return header, [by_layer[i] for i in range(header.model.num_layers)]
