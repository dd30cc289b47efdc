"""Framing for the KV channel's byte stream (both directions of one TCP connection).

    frame = b"SSKF" | u32 header_len | u64 body_len | msgpack header | body

Header types, prefill -> decode: begin {id, spec, layout, codec}, layers {id, first, count,
sizes}, done {id, first_token, events}, abort {id, reason}. Decode -> prefill: ack {id}, nack
{id, reason}. A `layers` body carries `count` consecutive layers from `first`: raw, each layer's
K||V bytes ([num_tokens, num_kv_heads, head_dim] each) back to back (sizes is nil); coded, one
codec section per layer, of the listed sizes. `begin` carries the codec stream header as its
body when a codec is used.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

MAGIC = b"SSKF"
_PREFIX = struct.Struct("<4sIQ")
MAX_HEADER = 1 << 20
MAX_BODY = 1 << 34


class ChannelError(ConnectionError):
    """The KV channel broke or carried a malformed frame."""


# A body is one buffer or several sent back to back (e.g. K and V straight from where they
# lie, so that a raw layer is never copied into one Python bytes object first).
Body = bytes | bytearray | memoryview | Sequence[memoryview]
# Where a body lands: (header, num_bytes) -> a writable buffer of that size (e.g. pinned memory).
BodyAllocator = Callable[[dict[str, Any], int], Any]


def body_parts(body: Body) -> list[memoryview]:
    parts = [body] if isinstance(body, (bytes, bytearray, memoryview)) else list(body)
    return [memoryview(p).cast("B") for p in parts]


def body_nbytes(body: Body) -> int:
    return sum(p.nbytes for p in body_parts(body))


def encode_frame(header: dict[str, Any], body: Body = b"") -> list[bytes | memoryview]:
    head = msgpack.packb(header, use_bin_type=True)
    parts = body_parts(body)
    return [_PREFIX.pack(MAGIC, len(head), sum(p.nbytes for p in parts)) + head, *parts]


def send_frame(sock: socket.socket, header: dict[str, Any], body: Body = b"") -> None:
    prefix, *parts = encode_frame(header, body)
    sock.sendall(prefix)
    for p in parts:
        if p.nbytes:
            sock.sendall(p)


def _recv_exact(sock: socket.socket, n: int, buf: Any = None) -> Any:
    """n bytes into `buf` (anything exposing a writable buffer; a new bytearray if None)."""
    buf = bytearray(n) if buf is None else buf
    view = memoryview(_writable(buf)).cast("B")
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ChannelError("peer closed the KV channel mid-frame" if got else "peer closed the KV channel")
        got += k
    return buf


def _writable(buf: Any) -> Any:
    """A torch tensor lands through its numpy view; everything else is a buffer already."""
    return buf.numpy() if hasattr(buf, "numpy") else buf


def recv_frame(sock: socket.socket, alloc: BodyAllocator | None = None) -> tuple[dict[str, Any], Any]:
    """One frame; the body lands in `alloc(header, size)` when given, else in a new bytearray."""
    magic, head_len, body_len = _PREFIX.unpack(_recv_exact(sock, _PREFIX.size))
    if magic != MAGIC or head_len > MAX_HEADER or body_len > MAX_BODY:
        raise ChannelError(f"malformed KV frame (magic={bytes(magic)!r}, header={head_len} B, body={body_len} B)")
    header = msgpack.unpackb(bytes(_recv_exact(sock, head_len)), raw=False)
    if not body_len:
        return header, bytearray()
    target = alloc(header, body_len) if alloc is not None else None
    return header, _recv_exact(sock, body_len, target)
