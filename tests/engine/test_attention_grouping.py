"""CPU decode attention in length groups gives exactly the padded result."""

import torch

from engine.attention import length_grouped
from kernels import reference as r


def test_length_groups_match_the_padded_batch_bit_for_bit():
    torch.manual_seed(0)
    num_blocks, block, heads, dim = 200, 16, 2, 32
    k, v = torch.randn(num_blocks, block, heads, dim), torch.randn(num_blocks, block, heads, dim)
    lens = torch.tensor([1, 30, 500, 0, 64, 17, 250, 33])      # includes an empty and a long row
    q = torch.randn(len(lens), 6, dim)
    tables = torch.stack([torch.randperm(num_blocks)[:32] for _ in lens]).int()
    padded = r.paged_decode_attention(q, k, v, tables, lens, 0.2)
    grouped = length_grouped(r.paged_decode_attention)(q, k, v, tables, lens, 0.2)
    assert torch.equal(padded, grouped)
    calls = []

    def spy(*args):
        calls.append(int(args[4].max()))
        return r.paged_decode_attention(*args)
    length_grouped(spy)(q, k, v, tables, lens, 0.2)
    assert len(calls) >= 3 and max(calls) == 500       # short rows no longer pad to 500
