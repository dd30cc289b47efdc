"""The pure-torch references against naive dense attention and plain indexing (CPU only)."""

from __future__ import annotations

import pytest
import torch

from kernels import reference as ref
from tests.kernels.conftest import dense_kv, make_paged_kv, naive_attention, rel_err

CPU = torch.device("cpu")


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_reference_matches_dense(group: int, block_size: int) -> None:
    lens = [1, 17, 32, 45]
    kc, vc, bt, cl = make_paged_kv(lens, 2, 16, block_size, torch.float32, CPU)
    q = torch.randn(len(lens), 2 * group, 16)
    out = ref.paged_decode_attention(q, kc, vc, bt, cl, 0.3)
    for i, n in enumerate(lens):
        k, v = dense_kv(kc, vc, bt[i], n)
        want = naive_attention(q[i : i + 1], k, v, torch.tensor([n - 1]), 0.3)[0]
        assert rel_err(out[i], want) < 1e-5


def test_decode_reference_zero_context_gives_zero() -> None:
    kc, vc, bt, cl = make_paged_kv([0, 5], 1, 8, 16, torch.float32, CPU)
    out = ref.paged_decode_attention(torch.randn(2, 2, 8), kc, vc, bt, cl, 1.0)
    assert out[0].abs().max() == 0 and out[1].abs().max() > 0


@pytest.mark.parametrize("group", [1, 3])
def test_prefill_reference_matches_dense(group: int) -> None:
    # (q_len, context): plain prefill, chunk after a cached prefix, single token, block multiple
    shapes = [(7, 7), (5, 21), (1, 33), (32, 32)]
    kc, vc, bt, cl = make_paged_kv([c for _, c in shapes], 2, 16, 16, torch.float32, CPU)
    qsl = torch.tensor([0, *torch.tensor([m for m, _ in shapes]).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), 2 * group, 16)
    out = ref.prefill_attention(q, kc, vc, bt, qsl, cl, 0.25)
    for i, (m, n) in enumerate(shapes):
        k, v = dense_kv(kc, vc, bt[i], n)
        want = naive_attention(q[qsl[i] : qsl[i + 1]], k, v, torch.arange(n - m, n), 0.25)
        assert rel_err(out[qsl[i] : qsl[i + 1]], want) < 1e-5


def test_prefill_reference_full_prefill_matches_sdpa() -> None:
    kc, vc, bt, cl = make_paged_kv([40], 4, 16, 16, torch.float32, CPU)
    q = torch.randn(40, 4, 16)
    out = ref.prefill_attention(q, kc, vc, bt, torch.tensor([0, 40], dtype=torch.int32), cl, 0.25)
    k, v = dense_kv(kc, vc, bt[0], 40)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=0.25)
    assert rel_err(out, want.transpose(0, 1)) < 1e-5


def test_store_gather_scatter_reference_round_trip() -> None:
    kc = torch.zeros(6, 16, 2, 8)
    vc = torch.zeros_like(kc)
    block_ids = torch.tensor([4, 1, 3])
    k, v = torch.randn(37, 2, 8), torch.randn(37, 2, 8)
    slots = torch.cat([block_ids[t // 16 : t // 16 + 1] * 16 + t % 16 for t in range(37)])
    ref.store_kv(k, v, kc, vc, slots.long())
    gk, gv = ref.gather_kv_blocks(kc, vc, block_ids, 37)
    assert torch.equal(gk, k) and torch.equal(gv, v)
    assert torch.equal(kc[4, 0], k[0]) and torch.equal(kc[3, 4], k[36])
    assert kc[3, 5:].abs().max() == 0 and kc[0].abs().max() == 0  # untouched slots
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    ref.scatter_kv_blocks(k, v, kc2, vc2, block_ids)
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc)


def test_store_reference_skips_minus_one() -> None:
    kc, vc = torch.zeros(2, 16, 1, 4), torch.zeros(2, 16, 1, 4)
    k = torch.ones(3, 1, 4)
    ref.store_kv(k, 2 * k, kc, vc, torch.tensor([5, -1, 20]))
    assert kc.view(-1, 4).sum(-1).nonzero().flatten().tolist() == [5, 20]
    assert vc.view(-1, 4)[20].tolist() == [2.0] * 4


def test_fused_add_rms_norm_and_silu_reference() -> None:
    x, r, w = torch.randn(3, 32), torch.randn(3, 32), torch.randn(32)
    normed, res = ref.fused_add_rms_norm(x, r, w, 1e-6)
    h = x + r
    assert torch.allclose(res, h)
    assert torch.allclose(normed, torch.nn.functional.rms_norm(h, (32,), w, 1e-6), atol=1e-5)
    gu = torch.randn(3, 64)
    assert torch.allclose(ref.silu_and_mul(gu), torch.nn.functional.silu(gu[:, :32]) * gu[:, 32:])
