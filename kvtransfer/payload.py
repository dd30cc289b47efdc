"""How one layer of one request's KV becomes bytes and back: raw (K||V as stored) or a codec
level from kvtransfer.codec. The pair is made once per request on each side."""

from __future__ import annotations

import torch

from kvtransfer.codec import KVDecoder, KVEncoder, ModelFingerprint
from kvtransfer.codec.format import dtype_name


def layout_of(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> ModelFingerprint:
    return ModelFingerprint(num_layers, num_kv_heads, head_dim, dtype_name(dtype))


def _as_bytes(t: torch.Tensor, host: torch.Tensor | None = None) -> memoryview:
    if t.is_cuda:  # raw KV leaves the GPU through a pinned buffer (pageable copies are ~50x slower)
        assert host is not None
        host.copy_(t)
        t = host
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


class LayerPacker:
    """Sender side: (k, v) of a layer, [num_tokens, num_kv_heads, head_dim] -> body. On a GPU
    the codec codes on the device; raw bytes are copied out."""

    def __init__(self, layout: ModelFingerprint, level: str, num_tokens: int) -> None:
        self.level = level
        self.encoder = None if level == "raw" else KVEncoder(layout, level, num_tokens=num_tokens)
        self._host: torch.Tensor | None = None   # one pinned buffer per request, reused by every layer

    def stream_header(self) -> bytes:
        return b"" if self.encoder is None else self.encoder.header()

    def pack(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> bytes | memoryview:
        if self.encoder is None:
            if k.is_cuda and (self._host is None or self._host.shape != k.shape):
                self._host = torch.empty(k.shape, dtype=k.dtype, pin_memory=True)
            return memoryview(bytes(_as_bytes(k, self._host)) + bytes(_as_bytes(v, self._host)))
        return self.encoder.encode_layer(layer_idx, k, v)


class LayerUnpacker:
    """Receiver side: body -> (k, v) on CPU; raises ValueError (CodecError) on a bad body."""

    def __init__(self, layout: ModelFingerprint, level: str, num_tokens: int, stream_header: bytes) -> None:
        self.layout, self.num_tokens = layout, num_tokens
        self.decoder = None if level == "raw" else KVDecoder(stream_header, expect=layout)

    def unpack(self, body: bytearray) -> tuple[torch.Tensor, torch.Tensor]:
        if self.decoder is not None:
            return self.decoder.decode_layer(bytes(body))
        dtype = self.layout.torch_dtype
        shape = (self.num_tokens, self.layout.num_kv_heads, self.layout.head_dim)
        half = len(body) // 2
        expected = self.num_tokens * self.layout.num_kv_heads * self.layout.head_dim * dtype.itemsize
        if half != expected or len(body) != 2 * expected:
            raise ValueError(f"raw KV layer body is {len(body)} bytes, expected {2 * expected}")
        flat = torch.frombuffer(body, dtype=torch.uint8)
        k = flat[:half].view(dtype).view(shape)
        v = flat[half:].view(dtype).view(shape)
        return k, v
