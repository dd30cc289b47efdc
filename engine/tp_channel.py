"""How the ranks of one tensor-parallel instance stay in lockstep.

Rank 0 owns the scheduler. For every step it broadcasts the step's inputs (token ids,
positions, attention metadata) plus a small control message (KV transfers to stream,
requests to admit) over a CPU (gloo) group; the other ranks run the same forward on their
shards. Control-only messages (no forward) carry work that arrives while rank 0 is idle.
"""

from __future__ import annotations

import datetime
from dataclasses import fields
from typing import Any

import msgpack
import numpy as np
import torch
import torch.distributed as dist

from engine.attention import AttentionMetadata
from engine.tensor_parallel import TPGroup

_TENSOR_FIELDS = [f.name for f in fields(AttentionMetadata)
                  if f.name not in ("num_prefill_tokens", "max_prefill_q_len")]


def init_tp(rank: int, size: int, master: tuple[str, int], device: torch.device,
            timeout_s: float = 600.0) -> tuple[TPGroup, "StepChannel"]:
    """Join this instance's process group; returns the model's TP group and the step channel."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    control = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD

    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def agree_min(n: int) -> int:
        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=control)
        return int(t.item())

    return TPGroup(rank, size, all_reduce, agree_min), StepChannel(control, device)


def _pack_tensor(t: torch.Tensor) -> list[Any]:
    a = t.detach().cpu().numpy()
    return [str(a.dtype), list(a.shape), a.tobytes()]


def _unpack_tensor(x: list[Any], device: torch.device) -> torch.Tensor:
    dtype, shape, data = x
    return torch.from_numpy(np.frombuffer(data, dtype=dtype).reshape(shape).copy()).to(device)


class StepChannel:
    def __init__(self, group: Any, device: torch.device) -> None:
        self.group, self.device = group, device

    def _broadcast(self, payload: bytes | None) -> bytes:
        size = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.int64)
        dist.broadcast(size, src=0, group=self.group)
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload is not None else \
            torch.empty(int(size.item()), dtype=torch.uint8)
        if buf.numel():
            dist.broadcast(buf, src=0, group=self.group)
        return payload if payload is not None else buf.numpy().tobytes()

    def send(self, control: dict[str, Any], step: tuple[torch.Tensor, torch.Tensor, AttentionMetadata] | None) -> None:
        msg: dict[str, Any] = {"control": control}
        if step is not None:
            ids, positions, meta = step
            msg["step"] = {"ids": _pack_tensor(ids), "positions": _pack_tensor(positions),
                           "num_prefill_tokens": meta.num_prefill_tokens, "max_prefill_q_len": meta.max_prefill_q_len,
                           **{name: _pack_tensor(getattr(meta, name)) for name in _TENSOR_FIELDS}}
        self._broadcast(msgpack.packb(msg, use_bin_type=True))

    def recv(self) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor, AttentionMetadata] | None]:
        msg = msgpack.unpackb(self._broadcast(None), raw=False)
        step = msg.get("step")
        if step is None:
            return msg["control"], None
        dev = self.device
        meta = AttentionMetadata(num_prefill_tokens=step["num_prefill_tokens"], max_prefill_q_len=step["max_prefill_q_len"],
                                 **{name: _unpack_tensor(step[name], dev) for name in _TENSOR_FIELDS})
        return msg["control"], (_unpack_tensor(step["ids"], dev), _unpack_tensor(step["positions"], dev), meta)
