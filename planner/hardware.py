"""What the planner knows without a profile: accelerator specs, a roofline step model, and the
KV memory model (how many KV blocks one instance holds).

Roofline (per TP rank, `tp` ranks split the weights and heads):
    prefill  b = 2 * params / (tp * flops * eff_c) + allreduce bytes/token / nvlink
             c = 4 * layers * heads * head_dim / (tp * flops * eff_c)     (QK^T and PV)
    decode   a = weight bytes / (tp * hbm * eff_m) + launch overhead
             b = KV bytes/token / (tp * hbm * eff_m),  c = 2 * params / (tp * flops * eff_c)
The efficiencies are what measured engines reach (AIConfigurator's "roofline + measured
efficiency"); a profile always wins over them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from planner.latency import LinearFit, StepModel


@dataclass(frozen=True)
class Accelerator:
    name: str
    flops: float                 # dense bf16 FLOP/s
    hbm_bytes_per_s: float
    memory_bytes: float
    nvlink_bytes_per_s: float    # per direction, between GPUs of one node
    eff_compute: float = 0.55
    eff_memory: float = 0.7
    launch_s: float = 3e-3       # per-step fixed cost (Python, launches) of this engine


ACCELERATORS: dict[str, Accelerator] = {
    "h100": Accelerator("h100", 989e12, 3.35e12, 80e9, 450e9),
    "h200": Accelerator("h200", 989e12, 4.8e12, 141e9, 450e9),
    "a100": Accelerator("a100", 312e12, 2.0e12, 80e9, 300e9),
    # one CPU core: a rough floor so an unprofiled CPU plan is not absurd; profile instead
    "cpu": Accelerator("cpu", 60e9, 15e9, 16e9, 5e9, eff_compute=0.5, eff_memory=0.5, launch_s=5e-3),
}


def accelerator_for(device: str, name: str | None = None) -> Accelerator:
    if device == "cpu":
        return ACCELERATORS["cpu"]
    key = (name or "").lower()
    for k in ("h200", "h100", "a100"):
        if k in key:
            return ACCELERATORS[k]
    return ACCELERATORS["h100"]


def dtype_bytes(dtype: str) -> int:
    return 4 if dtype in ("float32", "fp32") else 2


def roofline_step_model(model: ModelConfig, tp: int, acc: Accelerator, dtype: str = "bfloat16") -> StepModel:
    e = dtype_bytes(dtype)
    params = model.num_params - model.vocab_size * model.hidden_size  # the embedding is a lookup
    flops_c = acc.flops * acc.eff_compute * tp
    hbm = acc.hbm_bytes_per_s * acc.eff_memory * tp
    # two all-reduces of [tokens, hidden] per layer; ring: 2 (tp-1)/tp of the bytes each
    comm = 0.0 if tp == 1 else 2 * model.num_layers * model.hidden_size * e * 2 * (tp - 1) / tp / acc.nvlink_bytes_per_s
    attn = 4 * model.num_layers * model.num_heads * model.head_dim / flops_c
    prefill = LinearFit((acc.launch_s, 2 * params / flops_c + comm, attn), source="roofline")
    kv_per_token = model.kv_bytes_per_token(torch.bfloat16 if e == 2 else torch.float32)
    decode = LinearFit((acc.launch_s + params * e / hbm, kv_per_token / hbm, 2 * params / flops_c + comm),
                       source="roofline")
    return StepModel(tp, prefill, decode)


def kv_blocks_per_instance(model: ModelConfig, tp: int, acc: Accelerator, dtype: str, block_size: int,
                           memory_fraction: float = 0.85, reserve_bytes: float = 3e9) -> int:
    """Mirrors ModelRunner._blocks_that_fit: (fraction of memory) - weights - activations and
    CUDA graphs, split over the TP group's ranks like the KV heads."""
    e = dtype_bytes(dtype)
    per_rank = memory_fraction * acc.memory_bytes - model.num_params * e / tp - reserve_bytes
    kv_token = model.kv_bytes_per_token(torch.bfloat16 if e == 2 else torch.float32) / tp
    return max(0, int(per_rank // (kv_token * block_size)))


def tp_sizes(model: ModelConfig, gpus_per_node: int, max_tp: int = 8) -> list[int]:
    """TP sizes that split the KV heads evenly and fit in one node."""
    out, t = [], 1
    while t <= min(gpus_per_node, max_tp):
        if model.num_kv_heads % t == 0 and model.num_heads % t == 0:
            out.append(t)
        t *= 2
    return out
