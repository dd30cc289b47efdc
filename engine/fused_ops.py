"""The per-layer elementwise ops of the model (residual add + RMSNorm, SwiGLU, rotary), chosen
through a registry like the attention backends: "torch" (kernels.reference and the eager
rotary module; the CPU path, token-exact vs transformers) or "triton" (kernels/ ops and
engine/rope_kernel.py; CUDA only, one launch per op)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from engine.attention import resolve_backend


@dataclass(frozen=True)
class LayerOps:
    # (x, residual | None, weight, eps) -> (normed, x + residual)
    fused_add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    # gate_up [..., 2d] -> [..., d]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]
    # (rope module, positions [T], q [T, Hq, D], k [T, Hkv, D]) -> rotated (q, k)
    rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _eager_rotary(rope, positions, q, k):
    return rope(positions, q, k)


def _triton_rotary(rope, positions, q, k):
    rotary_embedding_ = importlib.import_module("engine.rope_kernel").rotary_embedding_
    rotary_embedding_(q, k, positions, rope.cos, rope.sin)  # in place on the qkv output's views
    return q, k


def _torch_ops() -> LayerOps:
    from kernels import reference as r
    return LayerOps(r.fused_add_rms_norm, r.silu_and_mul, _eager_rotary)


def _triton_ops() -> LayerOps:
    norm = importlib.import_module("kernels.rms_norm").fused_add_rms_norm
    act = importlib.import_module("kernels.activation").silu_and_mul
    importlib.import_module("engine.rope_kernel")  # compile-time errors surface here, not mid-step
    return LayerOps(norm, act, _triton_rotary)


BACKENDS: dict[str, Callable[[], LayerOps]] = {"torch": _torch_ops, "triton": _triton_ops}


def get_layer_ops(name: str, device: torch.device) -> LayerOps:
    """Same keys as engine.attention: "auto" is triton on CUDA, torch elsewhere."""
    return BACKENDS[resolve_backend(name, device)]()
