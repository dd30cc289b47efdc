"""How one layer of one request's KV becomes bytes and back: raw (K||V as stored) or a codec
level from kvtransfer.codec. The pair is made once per request on each side."""

from __future__ import annotations

import torch

from kvtransfer.codec import KVDecoder, KVEncoder, ModelFingerprint
from kvtransfer.codec.format import dtype_name


def layout_of(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> ModelFingerprint:
    return ModelFingerprint(num_layers, num_kv_heads, head_dim, dtype_name(dtype))


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


class LayerPacker:
    """Sender side: (k, v) of a layer, [num_tokens, num_kv_heads, head_dim] -> body. On a GPU
    the codec codes on the device; raw bytes are copied out."""

    def __init__(self, layout: ModelFingerprint, level: str, num_tokens: int) -> None:
        self.level = level
        self.encoder = None if level == "raw" else KVEncoder(layout, level, num_tokens=num_tokens)
        self._host: torch.Tensor | None = None   # [2, num_tokens, heads, head_dim] pinned, reused per layer
        self._stream: torch.cuda.Stream | None = None

    def stream_header(self) -> bytes:
        return b"" if self.encoder is None else self.encoder.header()

    def pack(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> bytes | memoryview:
        """The layer's body. k and v must be complete (the streamer syncs its gather stream).
        A raw body from a GPU is a view of this packer's pinned buffer, valid until the next
        call: the channel sends each body before packing the next, so nothing copies it again."""
        if self.encoder is not None:
            if not k.is_cuda:
                return self.encoder.encode_layer(layer_idx, k, v)
            # the codec's host reads sync the current stream: on the thread's default stream
            # they would wait for every forward pass queued on the device
            with torch.cuda.stream(self._side_stream(k.device)):
                return self.encoder.encode_layer(layer_idx, k, v)
        if not k.is_cuda:
            return _as_bytes(torch.stack([k, v]))
        # raw KV leaves the GPU through pinned memory (pageable copies are ~50x slower), on the
        # packer's own stream so that it does not queue behind the model's work
        if self._host is None or self._host.shape[1:] != k.shape:
            self._host = torch.empty((2, *k.shape), dtype=k.dtype, pin_memory=True)
        stream = self._side_stream(k.device)
        with torch.cuda.stream(stream):
            self._host[0].copy_(k, non_blocking=True)
            self._host[1].copy_(v, non_blocking=True)
        stream.synchronize()
        return _as_bytes(self._host)

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream


class LayerUnpacker:
    """Receiver side: body -> (k, v); raises ValueError (CodecError) on a bad body. Raw bodies
    stay on the host (views of the received bytes); coded ones are decoded on `device` when it is
    a GPU and the level has a device path (ready on return: the decoder syncs its side stream),
    else on the CPU."""

    def __init__(self, layout: ModelFingerprint, level: str, num_tokens: int, stream_header: bytes,
                 device: torch.device | str | None = None) -> None:
        self.layout, self.num_tokens = layout, num_tokens
        self.decoder = None if level == "raw" else KVDecoder(stream_header, expect=layout, device=device)
        self.pinned = device is not None and torch.device(device).type == "cuda"

    def landing_buffer(self, nbytes: int) -> torch.Tensor | None:
        """Where a raw body should be received: pinned host memory when the KV is bound for a
        GPU, so that admission copies it at full PCIe speed (and no fresh pages fault in);
        None means a plain bytearray."""
        if self.decoder is None and self.pinned:
            try:
                return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            except RuntimeError:   # pinning refused (e.g. host memory exhausted): pageable still works
                return None
        return None

    def unpack(self, body: bytearray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.decoder is not None:
            return self.decoder.decode_layer(body)
        dtype = self.layout.torch_dtype
        shape = (self.num_tokens, self.layout.num_kv_heads, self.layout.head_dim)
        half = len(body) // 2
        expected = self.num_tokens * self.layout.num_kv_heads * self.layout.head_dim * dtype.itemsize
        if half != expected or len(body) != 2 * expected:
            raise ValueError(f"raw KV layer body is {len(body)} bytes, expected {2 * expected}")
        flat = body if isinstance(body, torch.Tensor) else torch.frombuffer(body, dtype=torch.uint8)
        k = flat[:half].view(dtype).view(shape)
        v = flat[half:].view(dtype).view(shape)
        return k, v
