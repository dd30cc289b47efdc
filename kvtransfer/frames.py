"""Framing for the KV channel's byte stream (both directions of one TCP connection).

    frame = b"SSKF" | u32 header_len | u64 body_len | msgpack header | body

Header types, prefill -> decode: begin {id, spec, layout, codec}, layer {id, layer},
done {id, first_token, events}, abort {id, reason}. Decode -> prefill: ack {id}, nack {id, reason}.
A `layer` body is either raw K||V bytes ([num_tokens, num_kv_heads, head_dim] each) or one
codec section; `begin` carries the codec stream header as its body when a codec is used.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

MAGIC = b"SSKF"
_PREFIX = struct.Struct("<4sIQ")
MAX_HEADER = 1 << 20
MAX_BODY = 1 << 34


class ChannelError(ConnectionError):
    """The KV channel broke or carried a malformed frame."""


def encode_frame(header: dict[str, Any], body: bytes | memoryview = b"") -> list[bytes | memoryview]:
    head = msgpack.packb(header, use_bin_type=True)
    return [_PREFIX.pack(MAGIC, len(head), len(body)) + head, body]


def send_frame(sock: socket.socket, header: dict[str, Any], body: bytes | memoryview = b"") -> None:
    prefix, payload = encode_frame(header, body)
    sock.sendall(prefix)
    if len(payload):
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ChannelError("peer closed the KV channel mid-frame" if got else "peer closed the KV channel")
        got += k
    return buf


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], bytearray]:
    magic, head_len, body_len = _PREFIX.unpack(_recv_exact(sock, _PREFIX.size))
    if magic != MAGIC or head_len > MAX_HEADER or body_len > MAX_BODY:
        raise ChannelError(f"malformed KV frame (magic={bytes(magic)!r}, header={head_len} B, body={body_len} B)")
    header = msgpack.unpackb(bytes(_recv_exact(sock, head_len)), raw=False)
    body = _recv_exact(sock, body_len) if body_len else bytearray()
    return header, body
