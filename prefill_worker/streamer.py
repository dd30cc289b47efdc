"""The prefill side of KV transfer for one rank: which heads go to which decode rank
(a `ReshardPlan` per decode instance), one `KVSender` channel per decode rank, and the gather
of a layer's head slice from this rank's paged cache. Rank 0 and the other TP ranks of a
prefill instance each run one; only rank 0's channel to decode rank 0 carries control."""

from __future__ import annotations

from typing import Any, Callable

import torch

from engine.kv_cache import KVCache
from kernels.reference import gather_kv_blocks
from kvtransfer.payload import layout_of
from kvtransfer.reshard import ReshardPlan
from kvtransfer.sender import KVSender, ResultCallback


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
        k_cache, v_cache = self.kv_cache.layer(layer)
        for dst, (lo, hi) in self.plans[decode].routes(self.rank):
            a, b = lo - self.my_heads[0], hi - self.my_heads[0]
            self.channels[(decode, dst)].send_layer(rid, layer, self._gather(k_cache, v_cache, block_ids, num_tokens,
                                                                             a, b, ready))

    def _gather(self, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: list[int], num_tokens: int,
                a: int, b: int, ready: Any) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        """The layer's heads a:b, gathered on the channel's thread when it is the layer's turn."""
        whole = (a, b) == (0, k_cache.shape[2])

        def gather() -> tuple[torch.Tensor, torch.Tensor]:
            if self.side_stream is None:
                blocks = torch.tensor(block_ids, dtype=torch.int64)
                k, v = gather_kv_blocks(k_cache, v_cache, blocks, num_tokens)
                return (k, v) if whole else (k[:, a:b].contiguous(), v[:, a:b].contiguous())
            # on a side stream, after the layer's compute: overlaps the remaining layers.
            # The tensors stay on the GPU: the codec codes them there; raw goes to the host.
            with torch.cuda.stream(self.side_stream):
                blocks = torch.tensor(block_ids, dtype=torch.int64, device=k_cache.device)
                if ready is not None:
                    self.side_stream.wait_event(ready)
                k, v = gather_kv_blocks(k_cache, v_cache, blocks, num_tokens)
                if not whole:
                    k, v = k[:, a:b].contiguous(), v[:, a:b].contiguous()
                self.side_stream.synchronize()
            return k, v
        return gather

    def done(self, rid: str, decode: str, first_token: int, events: dict[str, float]) -> None:
        for dst, _ in self.plans[decode].routes(self.rank):
            self.channels[(decode, dst)].done(rid, first_token, events)

    def abort(self, rid: str, decode: str, reason: str) -> None:
        for dst, _ in self.plans[decode].routes(self.rank):
            self.channels[(decode, dst)].abort(rid, reason)

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()
