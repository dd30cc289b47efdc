"""A decode instance's request story:

    channel `begin`: blocks reserved for the prompt's KV (waits for room up to the transfer
                     timeout, then refuses; the prefill side retries elsewhere)
    channel `layer`: each layer's K/V scattered into the reserved blocks as it arrives
    channel `done`:  the request joins the running batch with its first token     KV_RECEIVED
    decode steps (continuous batching with the other running requests)          DECODE_START
      -> a token per step, streamed as events -> stop: blocks freed                  FINISHED
    transfer broken or aborted before `done`: the reservation is released.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from engine.engine import LLMEngine
from engine.request import LifecycleEvent
from engine.request_spec import request_from_spec
from engine.scheduler import ScheduledBatch
from kernels.reference import scatter_kv_blocks
from kvtransfer.codec import ModelFingerprint
from kvtransfer.payload import layout_of
from kvtransfer.receiver import KVReceiver, ReceiveHandler, TransferRefused


@dataclass
class Reservation:
    request_id: str
    spec: dict[str, Any]
    num_tokens: int
    block_ids: list[int]
    block_tensor: torch.Tensor


class DecodeWorker(LLMEngine, ReceiveHandler):
    def __init__(self, *args: Any, name: str = "decode-0", transfer_timeout_s: float = 30.0,
                 advertise_host: str = "127.0.0.1", **kwargs: Any) -> None:
        super().__init__(*args, policy="decode", **kwargs)
        self.name = name
        self.transfer_timeout_s = transfer_timeout_s
        self.layout = layout_of(self.model_config.num_layers, self.model_config.num_kv_heads,
                                self.model_config.head_dim, self.config.dtype)
        self.reserved_blocks = 0
        self.loop: Any = None  # the ServingLoop that owns this worker; set by the instance shell
        self.copy_stream = torch.cuda.Stream(self.runner.device) if self.runner.device.type == "cuda" else None
        self.receiver = KVReceiver(self, advertise_host=advertise_host)

    @property
    def address(self) -> tuple[str, int]:
        return self.receiver.address

    def stats(self) -> dict[str, int]:
        return {**super().stats(), "reserved_blocks": self.reserved_blocks}

    def close(self) -> None:
        self.receiver.close()

    # ---- ReceiveHandler (channel threads) --------------------------------------------------------

    def reserve(self, request_id: str, spec: dict[str, Any], layout: ModelFingerprint, num_tokens: int) -> Reservation:
        if layout != self.layout:
            raise TransferRefused(f"KV layout {layout.to_dict()} does not match this instance's {self.layout.to_dict()}")
        limit = self.scheduler.config.max_model_len
        if num_tokens >= limit:
            raise TransferRefused(f"prompt of {num_tokens} tokens exceeds max_model_len {limit}")
        deadline = time.monotonic() + self.transfer_timeout_s
        while True:
            blocks = self.loop.call(lambda: self._try_reserve(num_tokens)).result()
            if blocks is not None:
                break
            if time.monotonic() > deadline:
                raise TransferRefused(f"{self.name} had no room for {num_tokens} tokens within "
                                      f"{self.transfer_timeout_s:.0f} s")
            time.sleep(0.005)
        device = self.runner.device
        return Reservation(request_id, spec, num_tokens, blocks, torch.tensor(blocks, dtype=torch.int64, device=device))

    def write_layer(self, res: Reservation, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if tuple(k.shape) != (res.num_tokens, self.layout.num_kv_heads, self.layout.head_dim):
            raise ValueError(f"layer {layer_idx} K has shape {tuple(k.shape)}, expected "
                             f"{(res.num_tokens, self.layout.num_kv_heads, self.layout.head_dim)}")
        k_cache, v_cache = self.runner.kv_cache.layer(layer_idx)
        if self.copy_stream is None:
            scatter_kv_blocks(k, v, k_cache, v_cache, res.block_tensor)
            return
        with torch.cuda.stream(self.copy_stream):
            scatter_kv_blocks(k.pin_memory().to(k_cache.device, non_blocking=True),
                              v.pin_memory().to(v_cache.device, non_blocking=True), k_cache, v_cache, res.block_tensor)

    def admit(self, res: Reservation, first_token: int, events: dict[str, float]) -> None:
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        self.loop.call(lambda: self._admit(res, first_token, events)).result()

    def release(self, res: Reservation, reason: str) -> None:
        self.loop.call(lambda: self._release(res))

    # ---- loop thread -----------------------------------------------------------------------------

    def _try_reserve(self, num_tokens: int) -> list[int] | None:
        need = self.blocks.blocks_for(num_tokens + 1)
        # keep a block per running request free so that decoding requests can grow
        if self.blocks.num_free - need < len(self.scheduler.running):
            return None
        self.reserved_blocks += need
        return self.blocks.allocate(need)

    def _release(self, res: Reservation) -> None:
        if res.block_ids:
            self.blocks.free(res.block_ids)
            self.reserved_blocks -= len(res.block_ids)
            res.block_ids = []

    def _admit(self, res: Reservation, first_token: int, events: dict[str, float]) -> None:
        now = self.clock()
        req = request_from_spec({**res.spec, "events": events})
        req.output_token_ids = [first_token]
        req.num_computed_tokens = res.num_tokens
        req.block_table, res.block_ids = res.block_ids, []
        self.reserved_blocks -= len(req.block_table)
        req.record(LifecycleEvent.KV_RECEIVED, now)
        self.scheduler.admit_running(req)
        self.emit({"id": req.request_id, "kind": "kv_received", "t": now})

    def _on_scheduled(self, batch: ScheduledBatch) -> None:
        super()._on_scheduled(batch)
        now = self.clock()
        for s in batch.decodes:
            if LifecycleEvent.DECODE_START not in s.request.events:
                s.request.record(LifecycleEvent.DECODE_START, now)
                self.emit({"id": s.request.request_id, "kind": "decode_start", "t": now})
