"""Tensor parallelism applied from outside the model code (the model file stays single-device).

Rank r of a TP group of size t holds query heads [r*H/t, (r+1)*H/t), the KV heads those
queries read (KV heads are split when t <= Hkv and replicated when t > Hkv), and 1/t of the
MLP. Attention's o_proj and the MLP's down_proj are row-parallel and end in an all-reduce;
embeddings and the LM head stay replicated. All ranks of an instance keep identical block
tables, so one scheduler (on rank 0) drives them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from engine.config import ModelConfig
from engine.errors import ConfigError


def kv_heads_of(rank: int, tp: int, num_kv_heads: int) -> tuple[int, int]:
    """[start, end) of the global KV heads held by `rank` of a TP group of size `tp`."""
    if tp <= num_kv_heads:
        per = num_kv_heads // tp
        return rank * per, (rank + 1) * per
    head = rank // (tp // num_kv_heads)
    return head, head + 1


def q_heads_of(rank: int, tp: int, num_heads: int) -> tuple[int, int]:
    per = num_heads // tp
    return rank * per, (rank + 1) * per


def validate_tp(cfg: ModelConfig, tp: int, field: str = "tp") -> None:
    """Refuse a TP size that does not divide the model, naming the field and the sizes that work."""
    if tp == 1:
        return
    ok = [t for t in range(1, cfg.num_heads + 1) if _fits(cfg, t)]
    if not _fits(cfg, tp):
        raise ConfigError(f"{field}={tp} does not divide {cfg.name}'s heads ({cfg.num_heads} query, "
                          f"{cfg.num_kv_heads} KV) and MLP ({cfg.intermediate_size}); use one of {ok}")


def _fits(cfg: ModelConfig, tp: int) -> bool:
    kv_ok = cfg.num_kv_heads % tp == 0 if tp <= cfg.num_kv_heads else tp % cfg.num_kv_heads == 0
    return cfg.num_heads % tp == 0 and cfg.intermediate_size % tp == 0 and kv_ok


@dataclass(frozen=True)
class TPGroup:
    rank: int
    size: int
    all_reduce: Callable[[torch.Tensor], torch.Tensor]
    agree_min: Callable[[int], int] = lambda n: n   # the smallest value across ranks


def local_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The per-rank view used to size the KV cache: local KV heads."""
    from dataclasses import replace
    lo, hi = kv_heads_of(0, tp, cfg.num_kv_heads)
    return replace(cfg, num_kv_heads=hi - lo)


@torch.no_grad()
def apply_tp(model: torch.nn.Module, group: TPGroup) -> None:
    """Shard a fully loaded LlamaForCausalLM in place for `group.rank`."""
    cfg: ModelConfig = model.config
    t, r = group.size, group.rank
    validate_tp(cfg, t)
    d = cfg.head_dim
    q0, q1 = q_heads_of(r, t, cfg.num_heads)
    k0, k1 = kv_heads_of(r, t, cfg.num_kv_heads)
    inter = cfg.intermediate_size // t
    q_size, kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
    rows = torch.cat([torch.arange(q0 * d, q1 * d), q_size + torch.arange(k0 * d, k1 * d),
                      q_size + kv_size + torch.arange(k0 * d, k1 * d)])
    gate_up_rows = torch.cat([torch.arange(r * inter, (r + 1) * inter),
                              cfg.intermediate_size + torch.arange(r * inter, (r + 1) * inter)])
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _take_rows(attn.qkv_proj, rows)
        _take_cols(attn.o_proj, torch.arange(q0 * d, q1 * d))
        attn.num_heads, attn.num_kv_heads = q1 - q0, k1 - k0
        attn.reduce = group.all_reduce
        _take_rows(mlp.gate_up_proj, gate_up_rows)
        _take_cols(mlp.down_proj, torch.arange(r * inter, (r + 1) * inter))
        mlp.reduce = group.all_reduce


def _take_rows(linear: torch.nn.Linear, rows: torch.Tensor) -> None:
    rows = rows.to(linear.weight.device)
    linear.weight = torch.nn.Parameter(linear.weight[rows].contiguous(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias[rows].contiguous(), requires_grad=False)
    linear.out_features = rows.numel()


def _take_cols(linear: torch.nn.Linear, cols: torch.Tensor) -> None:
    linear.weight = torch.nn.Parameter(linear.weight[:, cols.to(linear.weight.device)].contiguous(),
                                       requires_grad=False)
    linear.in_features = cols.numel()
