"""gather_kv_blocks / scatter_kv_blocks (Triton) against the reference."""

from __future__ import annotations

import pytest
import torch

from kernels import reference as ref
from kernels.kv_blocks import gather_kv_blocks, scatter_kv_blocks


@pytest.mark.parametrize("num_tokens", [1, 16, 37, 64])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_gather_scatter_match_reference(device, num_tokens, block_size, id_dtype) -> None:
    num_blocks, heads, dim = 8, 3, 32
    kc = torch.randn(num_blocks, block_size, heads, dim, device=device, dtype=torch.float16)
    vc = torch.randn_like(kc)
    n_pages = -(-num_tokens // block_size)
    block_ids = torch.randperm(num_blocks)[:n_pages].to(id_dtype).to(device)

    k, v = gather_kv_blocks(kc, vc, block_ids, num_tokens)
    want_k, want_v = ref.gather_kv_blocks(kc.cpu(), vc.cpu(), block_ids.cpu(), num_tokens)
    assert k.shape == (num_tokens, heads, dim) and k.is_contiguous()
    assert torch.equal(k.cpu(), want_k) and torch.equal(v.cpu(), want_v)

    # scatter fresh values into other caches; slots past num_tokens must keep their old values
    new_k, new_v = torch.randn_like(k), torch.randn_like(v)
    kc2, vc2 = torch.randn_like(kc), torch.randn_like(vc)
    want_kc, want_vc = kc2.cpu().clone(), vc2.cpu().clone()
    ref.scatter_kv_blocks(new_k.cpu(), new_v.cpu(), want_kc, want_vc, block_ids.cpu())
    scatter_kv_blocks(new_k, new_v, kc2, vc2, block_ids)
    assert torch.equal(kc2.cpu(), want_kc) and torch.equal(vc2.cpu(), want_vc)


def test_round_trip_between_caches(device) -> None:
    # prefill side gathers, decode side scatters into different page ids: same tokens come back
    src_k = torch.randn(10, 16, 2, 64, device=device)
    src_v = torch.randn_like(src_k)
    dst_k, dst_v = torch.zeros_like(src_k), torch.zeros_like(src_v)
    src_ids = torch.tensor([7, 2, 5], device=device)
    dst_ids = torch.tensor([0, 9, 4], device=device)
    k, v = gather_kv_blocks(src_k, src_v, src_ids, 40)
    scatter_kv_blocks(k, v, dst_k, dst_v, dst_ids)
    back_k, back_v = gather_kv_blocks(dst_k, dst_v, dst_ids, 40)
    assert torch.equal(back_k, k) and torch.equal(back_v, v)
    assert torch.equal(dst_k[9], src_k[2]) and dst_k[4, 8:].abs().max() == 0


def test_rejects_too_many_tokens(device) -> None:
    kc = torch.zeros(2, 16, 1, 8, device=device)
    with pytest.raises(AssertionError):
        gather_kv_blocks(kc, kc, torch.tensor([0], device=device), 17)


@pytest.mark.gpu
def test_full_size_gpu() -> None:
    device = torch.device("cuda")
    kc = torch.randn(4096, 16, 8, 128, dtype=torch.bfloat16, device=device)
    vc = torch.randn_like(kc)
    ids = torch.randperm(4096, device=device)[:1000].int()
    k, v = gather_kv_blocks(kc, vc, ids, 15990)
    want_k, want_v = ref.gather_kv_blocks(kc, vc, ids, 15990)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    scatter_kv_blocks(k, v, kc2, vc2, ids)
    assert torch.equal(kc2[ids[:999].long()], kc[ids[:999].long()])
