"""prefill_attention (Triton) against the reference: packed variable-length queries that are
the last q_len tokens of each sequence's cached context."""

from __future__ import annotations

import pytest
import torch

from kernels import reference as ref
from kernels.prefill_attention import prefill_attention
from tests.kernels.conftest import TOL, dense_kv, make_paged_kv, naive_attention, rel_err

# (q_len, context_len): one token, plain prefill (odd, exact block multiple), a chunk after a
# cached prefix, a prefix-cache hit whose query starts mid-block, a query longer than a tile
SHAPES = [(1, 1), (19, 19), (32, 32), (8, 40), (13, 50), (70, 77), (1, 33)]


def _packed(shapes, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device):
    kc, vc, bt, cl = make_paged_kv([c for _, c in shapes], num_kv_heads, head_dim, block_size, dtype, device)
    qsl = torch.tensor([0, *torch.tensor([m for m, _ in shapes]).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), num_q_heads, head_dim, dtype=dtype, device=device)
    return q, kc, vc, bt, qsl.to(device), cl


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("block_size", [16, 32])
def test_matches_reference(device, group: int, block_size: int) -> None:
    if device.type == "cuda":
        dtypes = [torch.float32, torch.float16, torch.bfloat16]
    else:  # the interpreter is slow: fp16 once (bf16 dots are wrong there, see conftest TOL note)
        dtypes = [torch.float32] + ([torch.float16] if group == 4 and block_size == 16 else [])
    for dtype in dtypes:
        q, kc, vc, bt, qsl, cl = _packed(SHAPES, 2 * group, 2, 64, block_size, dtype, device)
        out = prefill_attention(q, kc, vc, bt, qsl, cl, 0.125, block_m=32, block_n=16)
        want = ref.prefill_attention(q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), qsl.cpu(), cl.cpu(), 0.125)
        assert out.shape == q.shape and out.dtype == dtype
        assert rel_err(out, want) < TOL[dtype], (dtype, rel_err(out, want))


def test_default_tiles_and_dense_attention(device) -> None:
    shapes = [(40, 40), (3, 100), (130, 130)]
    q, kc, vc, bt, qsl, cl = _packed(shapes, 9, 3, 64, 16, torch.float32, device)
    out = prefill_attention(q, kc, vc, bt, qsl, cl, 0.125, max_q_len=130)
    for i, (m, n) in enumerate(shapes):
        k, v = dense_kv(kc.cpu(), vc.cpu(), bt[i].cpu(), n)
        want = naive_attention(q[qsl[i] : qsl[i + 1]].cpu(), k, v, torch.arange(n - m, n), 0.125)
        assert rel_err(out[qsl[i] : qsl[i + 1]], want) < TOL[torch.float32]


def test_empty_sequence_in_batch(device) -> None:
    # a sequence with no queries this step (q_len 0) is skipped; its neighbours are unaffected
    shapes = [(5, 5), (0, 20), (4, 9)]
    q, kc, vc, bt, qsl, cl = _packed(shapes, 2, 2, 32, 16, torch.float32, device)
    out = prefill_attention(q, kc, vc, bt, qsl, cl, 0.2, block_m=16, block_n=16)
    want = ref.prefill_attention(q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), qsl.cpu(), cl.cpu(), 0.2)
    assert out.shape == (9, 2, 32) and rel_err(out, want) < TOL[torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "num_q_heads,num_kv_heads,head_dim,block_size",
    [(32, 8, 128, 16), (32, 8, 128, 32), (9, 3, 64, 16)],
)
def test_full_size_gpu(dtype, num_q_heads, num_kv_heads, head_dim, block_size) -> None:
    shapes = [(4096, 4096), (512, 512), (300, 2348), (1, 1000), (1000, 1777)]
    q, kc, vc, bt, qsl, cl = _packed(shapes, num_q_heads, num_kv_heads, head_dim, block_size, dtype,
                                     torch.device("cuda"))
    out = prefill_attention(q, kc, vc, bt, qsl, cl, head_dim**-0.5)
    want = ref.prefill_attention(q.float(), kc.float(), vc.float(), bt, qsl, cl, head_dim**-0.5)
    assert rel_err(out, want) < TOL[dtype]
