"""store_kv (Triton) against the reference."""

from __future__ import annotations

import pytest
import torch

from kernels import reference as ref
from kernels.kv_store import store_kv


def _slots(num_tokens: int, num_blocks: int, block_size: int, skip_every: int = 0) -> torch.Tensor:
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    if skip_every:
        slots[::skip_every] = -1
    return slots.long()


@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(device, num_tokens: int, block_size: int, dtype: torch.dtype) -> None:
    num_blocks, heads, dim = 4, 3, 64
    k = torch.randn(num_tokens, heads, dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    slots = _slots(num_tokens, num_blocks, block_size, skip_every=3 if num_tokens > 1 else 0).to(device)
    kc = torch.randn(num_blocks, block_size, heads, dim, dtype=dtype, device=device)
    vc = torch.randn_like(kc)
    want_k, want_v = kc.cpu().clone(), vc.cpu().clone()
    ref.store_kv(k.cpu(), v.cpu(), want_k, want_v, slots.cpu())
    store_kv(k, v, kc, vc, slots)
    assert torch.equal(kc.cpu(), want_k) and torch.equal(vc.cpu(), want_v)


def test_all_skipped_changes_nothing(device) -> None:
    kc = torch.randn(2, 16, 2, 64, device=device)
    before = kc.clone()
    store_kv(torch.ones(4, 2, 64, device=device), torch.ones(4, 2, 64, device=device), kc, kc.clone(),
             torch.full((4,), -1, dtype=torch.int64, device=device))
    assert torch.equal(kc, before)


def test_strided_views_and_int32_slots(device) -> None:
    # k and v sliced out of one fused [tokens, (q + k + v) heads, dim] projection
    qkv = torch.randn(5, 4 + 2 + 2, 64, device=device)
    k, v = qkv[:, 4:6], qkv[:, 6:8]
    kc = torch.zeros(2, 16, 2, 64, device=device)
    vc = torch.zeros_like(kc)
    slots = torch.tensor([0, 31, 16, 5, 6], dtype=torch.int32, device=device)
    store_kv(k, v, kc, vc, slots)
    flat_k, flat_v = kc.view(32, 2, 64), vc.view(32, 2, 64)
    assert torch.equal(flat_k[slots.long()], k) and torch.equal(flat_v[slots.long()], v)
    assert flat_k[1].abs().max() == 0


@pytest.mark.gpu
def test_full_size_gpu() -> None:
    device = torch.device("cuda")
    k = torch.randn(8192, 8, 128, dtype=torch.bfloat16, device=device)
    v = torch.randn_like(k)
    kc = torch.randn(1024, 16, 8, 128, dtype=torch.bfloat16, device=device)
    vc = torch.randn_like(kc)
    slots = _slots(8192, 1024, 16, skip_every=7).to(device)
    want_k, want_v = kc.clone(), vc.clone()
    ref.store_kv(k, v, want_k, want_v, slots)
    store_kv(k, v, kc, vc, slots)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
