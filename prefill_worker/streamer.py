"""The prefill side of KV transfer for one rank: which heads go to which decode rank
(a `ReshardPlan` per decode instance), one `KVSender` channel per decode rank, and the gather
of a request's head slice, a run of layers at a time, from this rank's paged cache. Rank 0
and the other TP ranks of a prefill instance each run one; only rank 0's channel to decode
rank 0 carries control."""

from __future__ import annotations

from typing import Any

import torch

from engine.kv_cache import KVCache
from kernels.reference import token_slots
from kvtransfer.payload import layout_of
from kvtransfer.reshard import ReshardPlan
from kvtransfer.sender import KVSender, ResultCallback


class PagedKVSource:
    """One request's KV heads a:b in this rank's paged cache, read a run of layers at a time
    on a channel's thread. On a GPU the gather runs on a side stream after the run's last layer
    (`ready`), overlapping the remaining layers' compute, and the result stays on the GPU (the
    codec codes it there; raw goes out through pinned memory)."""

    def __init__(self, kv: torch.Tensor, block_ids: list[int], num_tokens: int, heads: tuple[int, int],
                 side_stream: Any) -> None:
        self.kv = kv                      # [num_layers, 2, num_blocks, block_size, heads, head_dim]
        self.block_ids, self.num_tokens = list(block_ids), num_tokens
        self.heads = heads
        self.side_stream = side_stream
        self._slots: torch.Tensor | None = None

    def gather(self, first: int, count: int, ready: Any) -> torch.Tensor:
        if self.side_stream is None:
            return self._gather(first, count)
        with torch.cuda.stream(self.side_stream):
            if ready is not None:
                self.side_stream.wait_event(ready)
            kv = self._gather(first, count)
        self.side_stream.synchronize()
        return kv

    def _gather(self, first: int, count: int) -> torch.Tensor:
        if self._slots is None:
            blocks = torch.tensor(self.block_ids, dtype=torch.int64, device=self.kv.device)
            self._slots = token_slots(blocks, self.kv.shape[3], self.num_tokens)
        run = self.kv[first:first + count]
        run = run.view(count, 2, -1, *run.shape[4:])[:, :, self._slots]   # [count, 2, tokens, heads, head_dim]
        a, b = self.heads
        return run if (a, b) == (0, run.shape[3]) else run[:, :, :, a:b].contiguous()


class KVStreamer:
    def __init__(self, rank: int, tp: int, num_kv_heads: int, kv_cache: KVCache, on_result: ResultCallback,
                 link_gbps: float | None = None, timeout_s: float = 30.0) -> None:
        from engine.tensor_parallel import kv_heads_of
        self.rank, self.tp, self.num_kv_heads = rank, tp, num_kv_heads
        self.my_heads = kv_heads_of(rank, tp, num_kv_heads)
        self.kv_cache = kv_cache
        self.on_result = on_result
        self.link_gbps, self.timeout_s = link_gbps, timeout_s
        self.plans: dict[str, ReshardPlan] = {}
        self.channels: dict[tuple[str, int], KVSender] = {}
        self._sources: dict[tuple[str, str, int], PagedKVSource] = {}   # (request, decode, dst rank)
        self.side_stream = torch.cuda.Stream(kv_cache.kv.device) if kv_cache.kv.is_cuda else None

    def connect(self, peers: dict[str, dict[str, Any]]) -> None:
        """peers: decode instance -> {"tp": d, "addresses": [(host, port) per rank]}."""
        for name, peer in peers.items():
            plan = ReshardPlan(self.num_kv_heads, self.tp, int(peer["tp"]))
            self.plans[name] = plan
            for dst, _ in plan.routes(self.rank):
                if (name, dst) not in self.channels:
                    label = name if dst == 0 else f"{name}/rank{dst}"
                    self.channels[(name, dst)] = KVSender(label, tuple(peer["addresses"][dst]), self.on_result,
                                                          self.link_gbps, self.timeout_s)

    def knows(self, decode: str) -> bool:
        return decode in self.plans

    def control_channel(self, decode: str) -> KVSender:
        return self.channels[(decode, 0)]

    def begin(self, rid: str, decode: str, spec: dict[str, Any] | None, num_tokens: int, level: str) -> None:
        plan = self.plans[decode]
        spec_cfg = self.kv_cache.spec
        for dst, (lo, hi) in plan.routes(self.rank):
            layout = layout_of(spec_cfg.num_layers, hi - lo, spec_cfg.head_dim, spec_cfg.dtype)
            control = spec if (self.rank == 0 and dst == 0) else None
            self.channels[(decode, dst)].begin(rid, control, layout, level, num_tokens, (lo, hi), plan.num_sources(dst))

    def send_layer(self, rid: str, decode: str, layer: int, block_ids: list[int], num_tokens: int,
                   ready: Any = None) -> None:
        # called on the loop thread between a forward pass's layers: nothing here may wait for
        # the GPU (a device tensor made from a list would sync the model's stream every layer)
        for dst, (lo, hi) in self.plans[decode].routes(self.rank):
            key = (rid, decode, dst)
            source = self._sources.get(key)
            if source is None:
                a, b = lo - self.my_heads[0], hi - self.my_heads[0]
                source = self._sources[key] = PagedKVSource(self.kv_cache.kv, block_ids, num_tokens, (a, b),
                                                            self.side_stream)
            self.channels[(decode, dst)].send_layer(rid, layer, source, ready)

    def done(self, rid: str, decode: str, first_token: int, events: dict[str, float]) -> None:
        for dst, _ in self.plans[decode].routes(self.rank):
            self._sources.pop((rid, decode, dst), None)
            self.channels[(decode, dst)].done(rid, first_token, events)

    def abort(self, rid: str, decode: str, reason: str) -> None:
        for dst, _ in self.plans[decode].routes(self.rank):
            self._sources.pop((rid, decode, dst), None)
            self.channels[(decode, dst)].abort(rid, reason)

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()
