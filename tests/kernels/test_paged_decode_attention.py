"""paged_decode_attention (Triton) against the reference: awkward sizes on CPU via the
interpreter or on CUDA, full Llama/SmolLM2 sizes on CUDA."""

from __future__ import annotations

import pytest
import torch

from kernels import reference as ref
from kernels.paged_decode_attention import paged_decode_attention
from tests.kernels.conftest import TOL, dense_kv, make_paged_kv, naive_attention, rel_err

# 1 token, odd, a block multiple (16 and 32), partial blocks, longer than a partition
SMALL_LENS = [1, 37, 32, 16, 83, 130]


def _dtypes(device: torch.device) -> list[torch.dtype]:
    # the interpreter's bf16 dot is wrong (numpy has no bf16): bf16 is checked on CUDA only
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("partition_size", [None, 64])
def test_matches_reference(device, group: int, block_size: int, partition_size: int | None) -> None:
    for dtype in _dtypes(device):
        kc, vc, bt, cl = make_paged_kv(SMALL_LENS, 2, 64, block_size, dtype, device)
        q = torch.randn(len(SMALL_LENS), 2 * group, 64, dtype=dtype, device=device)
        out = paged_decode_attention(q, kc, vc, bt, cl, 0.125, partition_size=partition_size)
        want = ref.paged_decode_attention(q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), cl.cpu(), 0.125)
        assert out.shape == q.shape and out.dtype == dtype
        assert rel_err(out, want) < TOL[dtype], (dtype, rel_err(out, want))


def test_against_dense_attention_per_sequence(device) -> None:
    lens = [5, 64, 99]
    kc, vc, bt, cl = make_paged_kv(lens, 3, 64, 16, torch.float32, device)
    q = torch.randn(3, 9, 64, device=device)  # SmolLM2 ratio: 9 q heads over 3 kv heads
    out = paged_decode_attention(q, kc, vc, bt, cl, 0.125, partition_size=32, block_n=16)
    for i, n in enumerate(lens):
        k, v = dense_kv(kc.cpu(), vc.cpu(), bt[i].cpu(), n)
        want = naive_attention(q[i : i + 1].cpu(), k, v, torch.tensor([n - 1]), 0.125)[0]
        assert rel_err(out[i], want) < TOL[torch.float32]


def test_zero_context_and_odd_head_dim(device) -> None:
    # a padding sequence (context 0) yields zeros; head_dim 48 exercises the masked tail
    kc, vc, bt, cl = make_paged_kv([0, 21], 2, 48, 16, torch.float32, device)
    q = torch.randn(2, 4, 48, device=device)
    for ps in (None, 16):
        out = paged_decode_attention(q, kc, vc, bt, cl, 0.2, partition_size=ps, block_n=16)
        assert out[0].abs().max().item() == 0
        want = ref.paged_decode_attention(q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), cl.cpu(), 0.2)
        assert rel_err(out, want) < TOL[torch.float32]


def test_strided_query_view(device) -> None:
    # q sliced out of a fused qkv projection: token stride larger than heads * dim
    kc, vc, bt, cl = make_paged_kv([10, 40], 2, 64, 32, torch.float16, device)
    qkv = torch.randn(2, 8 * 64, dtype=torch.float16, device=device)
    q = qkv[:, : 4 * 64].view(2, 4, 64)
    out = paged_decode_attention(q, kc, vc, bt, cl, 0.125)
    want = ref.paged_decode_attention(q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), cl.cpu(), 0.125)
    assert rel_err(out, want) < TOL[torch.float16]


def test_rejects_bad_inputs(device) -> None:
    kc, vc, bt, cl = make_paged_kv([4], 2, 64, 16, torch.float32, device)
    with pytest.raises(AssertionError):
        paged_decode_attention(torch.randn(1, 3, 64, device=device), kc, vc, bt, cl, 1.0)  # 3 % 2
    with pytest.raises(AssertionError):
        paged_decode_attention(torch.randn(1, 2, 64, device=device), kc, vc, bt.long(), cl, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "num_q_heads,num_kv_heads,head_dim,block_size",
    [(32, 8, 128, 16), (32, 8, 128, 32), (9, 3, 64, 16), (32, 32, 128, 16)],
)
def test_full_size_gpu(dtype, num_q_heads, num_kv_heads, head_dim, block_size) -> None:
    device = torch.device("cuda")
    lens = [1, 4095, 4096, 32768, 1000, 17]
    kc, vc, bt, cl = make_paged_kv(lens, num_kv_heads, head_dim, block_size, dtype, device)
    q = torch.randn(len(lens), num_q_heads, head_dim, dtype=dtype, device=device)
    out = paged_decode_attention(q, kc, vc, bt, cl, head_dim**-0.5)
    want = ref.paged_decode_attention(q.float(), kc.float(), vc.float(), bt, cl, head_dim**-0.5)
    assert rel_err(out, want) < TOL[dtype]
    # batch 64 at 2K: the single-partition path
    lens = [2048 - i for i in range(64)]
    kc, vc, bt, cl = make_paged_kv(lens, num_kv_heads, head_dim, block_size, dtype, device)
    q = torch.randn(64, num_q_heads, head_dim, dtype=dtype, device=device)
    out = paged_decode_attention(q, kc, vc, bt, cl, head_dim**-0.5)
    want = ref.paged_decode_attention(q.float(), kc.float(), vc.float(), bt, cl, head_dim**-0.5)
    assert rel_err(out, want) < TOL[dtype]
