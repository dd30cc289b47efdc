"""Kernel tests run on CUDA when there is one, else through Triton's interpreter on CPU.

TRITON_INTERPRET is read when a kernel is decorated, i.e. when its module is first imported, so
it is set here, before any test module of this folder imports kernels.*; if something imported
a kernel module earlier in the same process without it, the `device` fixture says so.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the kernels under test run: cuda, or cpu under the interpreter."""
    if HAS_CUDA:
        return torch.device("cuda")
    import kernels.kv_store as mod  # any kernel module: were its kernels built interpreted?
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(mod._store_kv_kernel, InterpretedFunction):
        pytest.skip("kernel modules were imported before TRITON_INTERPRET=1 was set")
    return torch.device("cpu")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


# ---- shared builders (plain functions; the test modules import them from here) ----

def make_paged_kv(
    context_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int,
    dtype: torch.dtype, device: torch.device, extra_blocks: int = 3, pad_value: int = 10**6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random k/v caches and a block table handing each sequence shuffled pages.

    Block-table entries past a sequence's context hold `pad_value` (far out of range), so a
    kernel that dereferences them reads garbage or faults instead of passing by luck.
    Returns (k_cache, v_cache, block_tables int32, context_lens int32).
    """
    pages_per_seq = [-(-n // block_size) for n in context_lens]
    max_pages = max([1, *pages_per_seq]) + 1
    num_blocks = sum(pages_per_seq) + extra_blocks
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks).tolist()
    table = torch.full((len(context_lens), max_pages), pad_value, dtype=torch.int32)
    at = 0
    for i, n in enumerate(pages_per_seq):
        table[i, :n] = torch.tensor(perm[at : at + n], dtype=torch.int32)
        at += n
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return k_cache, v_cache, table.to(device), lens.to(device)


def dense_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, table_row: torch.Tensor, n: int):
    """Sequence's first n tokens as dense [n, kv_heads, dim] tensors, gathered page by page."""
    bs = k_cache.shape[1]
    pages = table_row[: -(-n // bs)].long().tolist()
    k = torch.cat([k_cache[p] for p in pages])[:n] if pages else k_cache[:0, 0]
    v = torch.cat([v_cache[p] for p in pages])[:n] if pages else v_cache[:0, 0]
    return k, v


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Dense causal attention in float64: q [m, hq, d] at absolute positions q_pos [m]; k/v
    [n, hkv, d] at positions 0..n-1; query sees keys with position <= its own."""
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, dim=1)                 # [n, hq, d]
    vv = v.double().repeat_interleave(group, dim=1)
    s = torch.einsum("mhd,nhd->hmn", q.double(), kk) * scale
    allowed = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos[:, None].to(q.device)
    s = s.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hmn,nhd->mhd", torch.softmax(s, -1), vv)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "output has NaN/inf"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# relative-error bounds per dtype (fp32 dots may run as tf32 on GPU)
TOL = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}
