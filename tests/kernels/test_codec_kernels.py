"""Codec kernels (quantize, histogram, rANS encode/compaction/decode) give the CPU reference's
bytes. Small sizes run under TRITON_INTERPRET=1 on CPU; the full-size check is GPU-only."""

import pytest
import torch

from kvtransfer.codec import KVEncoder, ModelFingerprint
from kvtransfer.codec.format import frame_section


def _same_bytes(kv: torch.Tensor, level: str, token_start: int = 0, seq_len: int | None = None) -> None:
    from kvtransfer.codec import gpu
    nl, _, t, hh, d = kv.shape
    fp = ModelFingerprint(nl, hh, d, str(kv.dtype).replace("torch.", ""))
    enc = KVEncoder(fp, level, token_start=token_start, num_tokens=t, seq_len=seq_len)
    ref = enc.encode_layers([(i, kv[i, 0].cpu(), kv[i, 1].cpu()) for i in range(nl)])
    de = gpu.encode_device(enc.h, kv)
    assert [frame_section(p) for p in gpu.payloads(enc.h, kv, de)] == ref
    assert torch.equal(gpu.decode_device(enc.h, de), de.syms)


@pytest.mark.parametrize("dtype,level,t", [(torch.float16, "default", 37), (torch.bfloat16, "aggressive", 20),
                                           (torch.float32, "int8", 9), (torch.bfloat16, "lossless", 33)])
def test_kernels_match_reference_bytes(device, dtype, level, t):
    kv = (torch.randn(2, 2, t, 2, 8) * torch.linspace(0.1, 4, 8)).to(dtype).to(device)
    kv[0, 0, 5, 1, 3] = 500.0  # an escape
    _same_bytes(kv, level, token_start=3, seq_len=t + 10)


def test_dequantize_kernel_matches_reference(device):
    import numpy as np

    from kernels.codec_quantize import dequantize
    from kvtransfer.codec import quant
    syms = torch.randint(0, 64, (3, 100), dtype=torch.uint8)
    step = torch.rand(3, 10) * 1e3
    got = dequantize(syms.to(device), step.to(device), 10, 10, 31, torch.float16).cpu()
    ref = quant.dequantize(syms.numpy(), np.repeat(step.numpy(), 10, axis=1), 31)
    ref = torch.from_numpy(np.clip(ref, -65504, 65504)).to(torch.float16)
    assert torch.equal(got, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [256, 2048])
def test_full_size_llama_chunk_same_bytes(t):
    kv = (torch.randn(32, 2, t, 8, 128, device="cuda") * torch.linspace(0.1, 4, 128, device="cuda")).bfloat16()
    _same_bytes(kv, "default", token_start=0, seq_len=t)
