"""fused_add_rms_norm and silu_and_mul (Triton) against the references."""

from __future__ import annotations

import pytest
import torch

from kernels import reference as ref
from kernels.activation import silu_and_mul
from kernels.rms_norm import fused_add_rms_norm
from tests.kernels.conftest import rel_err


@pytest.mark.parametrize("hidden", [64, 576, 100])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm(device, hidden, with_residual, dtype) -> None:
    x = torch.randn(5, hidden, dtype=dtype, device=device)
    res = torch.randn_like(x) if with_residual else None
    w = torch.randn(hidden, dtype=dtype, device=device)
    out, res_out = fused_add_rms_norm(x, res, w, 1e-5)
    want, want_res = ref.fused_add_rms_norm(x.cpu(), None if res is None else res.cpu(), w.cpu(), 1e-5)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # the interpreter's bf16 cast may truncate
    assert rel_err(res_out, want_res) < tol and rel_err(out, want) < tol


@pytest.mark.parametrize("shape", [(1, 2 * 8), (7, 2 * 1536), (2, 3, 2 * 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(device, shape, dtype) -> None:
    gu = torch.randn(*shape, dtype=dtype, device=device)
    out = silu_and_mul(gu)
    want = ref.silu_and_mul(gu.cpu())
    assert out.shape == want.shape
    assert rel_err(out, want) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
def test_full_size_gpu() -> None:
    x = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    res, w = torch.randn_like(x), torch.randn(4096, dtype=torch.bfloat16, device="cuda")
    out, res_out = fused_add_rms_norm(x, res, w, 1e-5)
    want, want_res = ref.fused_add_rms_norm(x, res, w, 1e-5)
    assert torch.equal(res_out, want_res) and rel_err(out, want) < 1e-2
    gu = torch.randn(4096, 2 * 14336, dtype=torch.bfloat16, device="cuda")
    assert rel_err(silu_and_mul(gu), ref.silu_and_mul(gu)) < 1e-2
