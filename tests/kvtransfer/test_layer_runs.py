"""Runs of layers: the channel merges the queued layers of a request into one frame, and a
run's body round-trips raw and coded."""

import pytest
import torch

from kvtransfer.payload import LayerPacker, LayerUnpacker, layout_of
from kvtransfer.sender import coalesce


class _Source:
    def gather(self, first, count, ready):
        raise AssertionError("not read here")


def test_queued_layers_of_each_request_merge_in_order():
    a, b = _Source(), _Source()
    jobs = [("begin", "r1", None), ("layer", "r1", (0, "e0", a)), ("begin", "r2", None),
            ("layer", "r2", (0, "f0", b)), ("layer", "r1", (1, "e1", a)), ("layer", "r2", (1, "f1", b)),
            ("layer", "r1", (2, "e2", a)), ("done", "r1", None), ("layer", "r2", (3, "f3", b)), None,
            ("layer", "r2", (4, "f4", b))]
    out = coalesce(jobs)
    kinds = [(j[0], j[1]) if j else None for j in out]
    assert kinds == [("begin", "r1"), ("layers", "r1"), ("begin", "r2"), ("layers", "r2"), ("done", "r1"),
                     ("layers", "r2"), None]
    r1, r2, r2_gap = out[1][2], out[3][2], out[5][2]
    assert (r1.first, r1.count, r1.ready, r1.source) == (0, 3, "e2", a)   # waits for its last layer
    assert (r2.first, r2.count, r2.ready) == (0, 2, "f1")
    assert (r2_gap.first, r2_gap.count) == (3, 1)                       # a gap starts a new run


def test_a_new_source_for_the_same_request_starts_a_new_run():
    a, a2 = _Source(), _Source()     # e.g. a retry re-reads the request from its blocks
    out = coalesce([("layer", "r", (0, None, a)), ("layer", "r", (1, None, a2))])
    assert [(j[2].first, j[2].count) for j in out] == [(0, 1), (1, 1)]


@pytest.mark.parametrize("level", ["raw", "lossless", "default"])
def test_a_run_round_trips(level):
    torch.manual_seed(0)
    layout = layout_of(6, 2, 16, torch.float16)
    kv = torch.randn(6, 2, 9, 2, 16).to(torch.float16)
    packer = LayerPacker(layout, level, 9)
    unpacker = LayerUnpacker(layout, level, 9, packer.stream_header())
    body, sizes = packer.pack_layers(2, kv[2:5])
    flat = b"".join(bytes(s) for s in body) if isinstance(body, list) else bytes(body)
    got = unpacker.unpack_layers(bytearray(flat), 2, 3, sizes)
    assert got.shape == (3, 2, 9, 2, 16)
    if level in ("raw", "lossless"):
        assert torch.equal(got, kv[2:5])
    else:
        assert (got.float() - kv[2:5].float()).abs().mean() < 0.1
        # each layer decodes to what the same layer coded alone decodes to
        alone = unpacker.unpack(packer.pack(3, kv[3, 0], kv[3, 1]))
        assert torch.equal(got[1, 0], alone[0]) and torch.equal(got[1, 1], alone[1])


def test_a_run_that_does_not_match_its_header_is_refused():
    layout = layout_of(4, 2, 8, torch.float32)
    kv = torch.randn(2, 2, 3, 2, 8)
    raw = LayerUnpacker(layout, "raw", 3, b"")
    body = bytearray(bytes(LayerPacker(layout, "raw", 3).pack_layers(0, kv)[0]))
    with pytest.raises(ValueError, match="expected"):
        raw.unpack_layers(body, 0, 1)                 # the header says one layer, the body holds two
    with pytest.raises(ValueError, match="outside"):
        raw.unpack_layers(body, 3, 2)                 # past the stream's last layer
    packer = LayerPacker(layout, "lossless", 3)
    coded = LayerUnpacker(layout, "lossless", 3, packer.stream_header())
    sections, sizes = packer.pack_layers(1, kv)
    flat = bytearray(b"".join(sections))
    with pytest.raises(ValueError, match="split"):
        coded.unpack_layers(flat, 1, 2, sizes[:1])
    with pytest.raises(ValueError, match="layers"):
        coded.unpack_layers(flat, 0, 2, sizes)        # sections are for layers 1, 2
