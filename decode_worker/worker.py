"""A decode instance's request story (rank 0, which owns the scheduler):

    KV frames land in host staging as they arrive, from every prefill rank that holds
    heads this rank owns; the control channel adds the request and its first token
    complete -> queued for admission                                           KV_RECEIVED
    admission: blocks allocated (waits for room, up to the transfer timeout, then nack);
      staged KV scattered into the blocks on every TP rank; the request joins running; ack
    decode steps (continuous batching with the other running requests)          DECODE_START
      -> a token per step, streamed as events -> stop: blocks freed                  FINISHED
    a transfer that breaks or is aborted before admission leaves only staging, which is dropped.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from engine.engine import LLMEngine
from engine.request import LifecycleEvent
from engine.request_spec import request_from_spec
from engine.scheduler import ScheduledBatch
from engine.tensor_parallel import kv_heads_of
from kvtransfer.codec.format import dtype_name
from kvtransfer.receiver import KVReceiver
from kernels.reference import token_slots
from kvtransfer.staging import StagedFrame, StagedRequest, StagingArea


@dataclass
class Reservation:
    """A staged request being admitted: its blocks on this instance."""
    request_id: str
    num_tokens: int
    block_tensor: torch.Tensor


def scatter_heads(kv_cache: Any, frame: StagedFrame, blocks: torch.Tensor) -> None:
    """A staged run of layers -> local heads a:b of the request's pages, one indexed write for
    all its layers. KV bound for a GPU is staged there already (kvtransfer.payload.DeviceEntry)."""
    n, kv = frame.kv.shape[0], frame.kv
    run = kv_cache.kv[frame.first:frame.first + n]     # [n, 2, num_blocks, block_size, heads, head_dim]
    slots = token_slots(blocks, run.shape[3], kv.shape[2])
    if kv.is_cuda:   # staged on a receiver's stream: its memory must outlive this stream's use
        kv.record_stream(torch.cuda.current_stream(kv.device))
    run.view(n, 2, -1, *run.shape[4:])[:, :, slots, frame.a:frame.b] = kv.to(run.device, run.dtype, non_blocking=True)


def check_frame(frame: StagedFrame, num_tokens: int, model_config: Any) -> None:
    want = (2, num_tokens, frame.b - frame.a, model_config.head_dim)
    n = frame.kv.shape[0]
    if tuple(frame.kv.shape[1:]) != want or frame.first + n > model_config.num_layers:
        raise ValueError(f"layers {frame.first}..{frame.first + n - 1}: KV has shape {tuple(frame.kv.shape)}, "
                         f"expected [n, *{want}] within {model_config.num_layers} layers")


class DecodeWorker(LLMEngine):
    def __init__(self, *args: Any, name: str = "decode-0", transfer_timeout_s: float = 30.0,
                 advertise_host: str = "127.0.0.1", **kwargs: Any) -> None:
        super().__init__(*args, policy="decode", **kwargs)
        self.name = name
        self.transfer_timeout_s = transfer_timeout_s
        self.loop: Any = None  # the ServingLoop that owns this worker; set by the instance shell
        self.ready: deque[tuple[StagedRequest, float]] = deque()   # complete, waiting for blocks
        tp = self.runner.tp
        heads = kv_heads_of(0, tp.size if tp else 1, self.model_config.num_kv_heads)
        self.staging = StagingArea(control=True, on_complete=self._on_complete, ttl_s=4 * transfer_timeout_s)
        self.receiver = KVReceiver(self.staging, heads, self.model_config.head_dim, dtype_name(self.config.dtype),
                                   advertise_host=advertise_host, device=self.runner.device)

    @property
    def address(self) -> tuple[str, int]:
        return self.receiver.address

    def stats(self) -> dict[str, int]:
        return {**super().stats(), "staged": len(self.staging), "reserved_blocks": 0}

    def close(self) -> None:
        self.receiver.close()

    # ---- admission (loop thread) ---------------------------------------------------------------

    def _on_complete(self, staged: StagedRequest) -> None:
        """A channel thread saw the last frame land; admission happens on the loop thread."""
        self.loop.call(lambda: self.ready.append((staged, time.monotonic())))

    def step(self) -> list:
        self._admit_ready()
        return super().step()

    def _admit_ready(self) -> None:
        while self.ready:
            staged, since = self.ready[0]
            rid = staged.request_id
            if not self.staging.contains(rid):   # aborted, or its channel broke
                self.ready.popleft()
                continue
            need = self.blocks.blocks_for(staged.num_tokens + 1)
            # keep a block per running request free so that decoding requests can grow
            if self.blocks.num_free - need < len(self.scheduler.running):
                if time.monotonic() - since <= self.transfer_timeout_s:
                    return  # FIFO: wait for room
                self.ready.popleft()
                self.staging.pop(rid)
                staged.reply(False, f"{self.name} had no room for {staged.num_tokens} tokens within "
                                    f"{self.transfer_timeout_s:.0f} s")
                continue
            self.ready.popleft()
            self.staging.pop(rid)
            self._admit(staged, self.blocks.allocate(need))

    def _admit(self, staged: StagedRequest, block_ids: list[int]) -> None:
        res = Reservation(staged.request_id, staged.num_tokens,
                          torch.tensor(block_ids, dtype=torch.int64, device=self.runner.device))
        try:
            for frame in staged.frames:
                self.write_frame(res, frame)
            failed = self._admit_on_other_ranks(staged.request_id, block_ids)
            if failed:
                raise ValueError(f"TP ranks {failed} of {self.name} did not receive their KV heads in time")
        except (ValueError, RuntimeError) as exc:
            self.blocks.free(block_ids)
            staged.reply(False, f"bad KV for {staged.request_id}: {exc}")
            return
        now = self.clock()
        first_token, events = staged.done  # type: ignore[misc]
        req = request_from_spec({**staged.spec, "events": events})  # type: ignore[dict-item]
        req.output_token_ids = [first_token]
        req.num_computed_tokens = staged.num_tokens
        req.block_table = block_ids
        req.record(LifecycleEvent.KV_RECEIVED, now)
        self.scheduler.admit_running(req)
        self.emit({"id": req.request_id, "kind": "kv_received", "t": now})
        staged.reply(True, None)

    def write_frame(self, res: Reservation, frame: StagedFrame) -> None:
        """One staged run of layers into this rank's pages (a test seam for injected failures)."""
        check_frame(frame, res.num_tokens, self.model_config)
        scatter_heads(self.runner.kv_cache, frame, res.block_tensor)

    def _admit_on_other_ranks(self, request_id: str, block_ids: list[int]) -> list[int]:
        """TP > 1: the other ranks land their staged heads too; returns ranks that failed."""
        admit = getattr(self.runner, "admit_on_followers", None)
        return admit(request_id, block_ids) if admit is not None else []

    def _on_scheduled(self, batch: ScheduledBatch) -> None:
        super()._on_scheduled(batch)
        now = self.clock()
        for s in batch.decodes:
            if LifecycleEvent.DECODE_START not in s.request.events:
                s.request.record(LifecycleEvent.DECODE_START, now)
                self.emit({"id": s.request.request_id, "kind": "decode_start", "t": now})
