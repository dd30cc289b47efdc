"""How a run of consecutive layers of one request's KV becomes bytes and back: raw (each
layer's K||V as stored, back to back) or a codec level from kvtransfer.codec (one section per
layer). The pair is made once per request on each side.

A run's KV travels as one tensor, [num_layers_in_run, 2 (K, V), num_tokens, num_kv_heads,
head_dim]: one gather, one device-to-host copy and one send per run rather than per layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtransfer.codec import KVDecoder, KVEncoder, ModelFingerprint
from kvtransfer.codec.format import dtype_name


def layout_of(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> ModelFingerprint:
    return ModelFingerprint(num_layers, num_kv_heads, head_dim, dtype_name(dtype))


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


class DeviceExit:
    """How a channel's KV leaves a GPU: its own stream (so that copies and codec launches do
    not queue behind the model's work) and one pinned buffer that grows to the largest run
    and is reused by every request the channel sends (pageable copies are ~50x slower, and
    pinning fresh memory per request costs more than the copy)."""

    def __init__(self) -> None:
        self._stream: torch.cuda.Stream | None = None
        self._pinned: torch.Tensor | None = None

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def to_host(self, kv: torch.Tensor) -> torch.Tensor:
        """A pinned copy of kv, valid until the next call."""
        nbytes = kv.numel() * kv.element_size()
        if self._pinned is None or self._pinned.numel() < nbytes:
            self._pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        host = self._pinned[:nbytes].view(kv.dtype).view(kv.shape)
        stream = self.stream(kv.device)
        with torch.cuda.stream(stream):
            host.copy_(kv, non_blocking=True)
        stream.synchronize()
        return host


class LayerPacker:
    """Sender side: a run's KV [n, 2, num_tokens, num_kv_heads, head_dim] -> (body, section
    sizes; None for raw). On a GPU the codec codes on the device; raw bytes are copied out."""

    def __init__(self, layout: ModelFingerprint, level: str, num_tokens: int, via: DeviceExit | None = None) -> None:
        self.level = level
        self.encoder = None if level == "raw" else KVEncoder(layout, level, num_tokens=num_tokens)
        self.via = via or DeviceExit()

    def stream_header(self) -> bytes:
        return b"" if self.encoder is None else self.encoder.header()

    def pack_layers(self, first: int, kv: torch.Tensor) -> tuple[memoryview | list[bytes], list[int] | None]:
        """kv must be complete (the streamer syncs its gather stream). A raw body from a GPU is
        a view of the exit's pinned buffer, valid until its next copy: a channel sends each
        body before packing the next, so nothing copies it again."""
        if self.encoder is not None:
            layers = [(first + j, kv[j, 0], kv[j, 1]) for j in range(kv.shape[0])]
            if not kv.is_cuda:
                sections = self.encoder.encode_layers(layers)
            else:
                # the codec's host reads sync the current stream: on the thread's default stream
                # they would wait for every forward pass queued on the device
                with torch.cuda.stream(self.via.stream(kv.device)):
                    sections = self.encoder.encode_layers(layers)
            return sections, [len(s) for s in sections]
        return _as_bytes(self.via.to_host(kv) if kv.is_cuda else kv), None

    def pack(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> bytes | memoryview:
        """One layer's body (k, v: [num_tokens, num_kv_heads, head_dim])."""
        body, _ = self.pack_layers(layer_idx, torch.stack([k, v])[None])
        return body[0] if isinstance(body, list) else body


class DeviceEntry:
    """How raw KV bound for a GPU lands, per connection: in one pinned buffer that grows to the
    largest run and is reused (pinning memory costs far more than copying into memory already
    pinned, and a fresh buffer per frame pinned new memory whenever the host allocator's cache
    had no free block of the size), then copied to the device on the connection's own stream at
    once, so that staging holds device tensors and the buffer is free for the next frame."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._pinned: torch.Tensor | None = None
        self._stream: torch.cuda.Stream | None = None

    def landing(self, nbytes: int) -> torch.Tensor | None:
        """A pinned buffer of nbytes, valid until the next call; None (land in pageable memory)
        when pinning is refused, e.g. host memory exhausted."""
        if self._pinned is None or self._pinned.numel() < nbytes:
            grown = max(nbytes, 2 * self._pinned.numel()) if self._pinned is not None else nbytes
            self._pinned = None
            try:
                self._pinned = torch.empty(grown, dtype=torch.uint8, pin_memory=True)
            except RuntimeError:
                return None
        return self._pinned[:nbytes]

    def to_device(self, kv: torch.Tensor) -> torch.Tensor:
        """kv on the device, complete on return (so its landing buffer can be reused)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._stream):
            out = kv.to(self.device, non_blocking=True)
        self._stream.synchronize()
        return out


class LayerUnpacker:
    """Receiver side: body -> KV [n, 2, num_tokens, num_kv_heads, head_dim]; raises ValueError
    (CodecError) on a bad body. Raw bodies come back as views of the received bytes; coded ones
    are decoded on `device` when it is a GPU and the level has a device path (ready
    on return: the decoder syncs its side stream), else on the CPU."""

    def __init__(self, layout: ModelFingerprint, level: str, num_tokens: int, stream_header: bytes,
                 device: torch.device | str | None = None) -> None:
        self.layout, self.num_tokens = layout, num_tokens
        self.decoder = None if level == "raw" else KVDecoder(stream_header, expect=layout, device=device)

    @property
    def raw(self) -> bool:
        return self.decoder is None

    def unpack_layers(self, body: bytearray | torch.Tensor, first: int, count: int,
                      sizes: Sequence[int] | None = None) -> torch.Tensor:
        if not 0 <= first < first + count <= self.layout.num_layers:
            raise ValueError(f"layers {first}..{first + count - 1} are outside the stream's "
                             f"{self.layout.num_layers} layers")
        if self.decoder is not None:
            return self._decode(body, first, count, sizes)
        dtype = self.layout.torch_dtype
        shape = (count, 2, self.num_tokens, self.layout.num_kv_heads, self.layout.head_dim)
        expected = dtype.itemsize
        for s in shape:
            expected *= s
        if len(body) != expected:
            raise ValueError(f"raw KV body of {count} layer(s) is {len(body)} bytes, expected {expected}")
        flat = body if isinstance(body, torch.Tensor) else torch.frombuffer(body, dtype=torch.uint8)
        return flat.view(dtype).view(shape)

    def _decode(self, body: bytearray | torch.Tensor, first: int, count: int,
                sizes: Sequence[int] | None) -> torch.Tensor:
        if sizes is None or len(sizes) != count or sum(sizes) != len(body) or min(sizes) < 0:
            raise ValueError(f"coded KV body of {len(body)} bytes does not split into {count} sections "
                             f"of sizes {sizes}")
        view = memoryview(body.numpy() if isinstance(body, torch.Tensor) else body).cast("B")
        sections, at = [], 0
        for s in sizes:
            sections.append(view[at:at + s])
            at += s
        decoded = self.decoder.decode_layers_indexed(sections)
        got = [i for i, _, _ in decoded]
        if got != list(range(first, first + count)):
            raise ValueError(f"coded KV sections are for layers {got}, the frame says {first}..{first + count - 1}")
        return torch.stack([torch.stack([k, v]) for _, k, v in decoded])

    def unpack(self, body: bytearray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's (k, v) from its body (the layer index is the section's own, or 0 for raw)."""
        if self.decoder is not None:
            return self.decoder.decode_layer(body)
        kv = self.unpack_layers(body, 0, 1)
        return kv[0, 0], kv[0, 1]
