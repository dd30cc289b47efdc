"""KV channel framing: bodies sent from several buffers, received into a caller's buffer."""

import socket

import pytest
import torch

from kvtransfer.frames import ChannelError, body_nbytes, recv_frame, send_frame
from kvtransfer.payload import DeviceEntry, LayerPacker, LayerUnpacker, layout_of


def test_parts_arrive_as_one_body_in_the_callers_buffer():
    a, b = socket.socketpair()
    k, v = torch.randn(5, 2, 4), torch.randn(5, 2, 4)
    parts = [memoryview(k.numpy()), memoryview(v.numpy())]
    assert body_nbytes(parts) == 2 * k.numel() * 4
    send_frame(a, {"type": "layer", "id": "r"}, parts)
    send_frame(a, {"type": "end", "id": "r"})
    landed: list[int] = []

    def land(header, n):
        landed.append(n)
        return torch.empty(n, dtype=torch.uint8)
    header, body = recv_frame(b, land)
    assert header == {"type": "layer", "id": "r"} and isinstance(body, torch.Tensor)
    assert torch.equal(body.view(torch.float32), torch.cat([k.flatten(), v.flatten()]))
    assert recv_frame(b, land)[0]["type"] == "end" and landed == [body.numel()]   # no body, no buffer
    a.close()
    with pytest.raises(ChannelError):
        recv_frame(b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_raw_layer_round_trip_through_a_landing_buffer(dtype):
    layout = layout_of(2, 3, 8, dtype)
    k, v = torch.randn(7, 3, 8).to(dtype), torch.randn(7, 3, 8).to(dtype)
    body = LayerPacker(layout, "raw", 7).pack(0, k, v)
    unpacker = LayerUnpacker(layout, "raw", 7, b"")
    target = torch.empty(len(body), dtype=torch.uint8)
    target.numpy()[:] = memoryview(body)
    k2, v2 = unpacker.unpack(target)
    assert torch.equal(k2, k) and torch.equal(v2, v)
    with pytest.raises(ValueError, match="expected"):
        unpacker.unpack(target[:-2])


def test_a_refused_pinned_landing_falls_back_to_pageable_memory(monkeypatch):
    entry = DeviceEntry("cuda")      # as on a GPU decode rank

    def refuse(*args, **kwargs):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
    monkeypatch.setattr(torch, "empty", refuse)
    assert entry.landing(96) is None
