"""A prefill instance's request story (rank 0, which owns the scheduler):

    add(spec, decode target) -> waiting -> prefill chunk(s)                       PREFILL_START
      -> final chunk: as each layer finishes, every TP rank queues its KV heads on its
         channels to the decode ranks that own them (encode + send overlap later layers)
      -> first token sampled                                                     FIRST_TOKEN
           stops already (EOS, max_tokens=1)? finished here; the channels are told to abort
           otherwise: `done` goes out; the request leaves the scheduler but keeps its blocks
      -> ack from the decode side: blocks freed                                  KV_SENT
         failure: reported (`transfer_failed`), blocks kept for `retry_transfer` to another
         decode instance, or freed by `drop`
Other TP ranks learn what to stream from the control part of rank 0's step broadcast.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from engine.engine import LLMEngine
from engine.request import LifecycleEvent, Request, RequestStatus
from engine.request_spec import request_from_spec, request_to_spec
from engine.scheduler import ScheduledBatch
from kvtransfer.codec import choose_level, coding_rates
from prefill_worker.streamer import KVStreamer


class PrefillWorker(LLMEngine):
    def __init__(self, *args: Any, name: str = "prefill-0", codec: str = "raw", link_gbps: float | None = None,
                 transfer_timeout_s: float = 30.0, auto_budget_s: float = 0.1, **kwargs: Any) -> None:
        super().__init__(*args, policy="prefill", **kwargs)
        self.name = name
        self.codec = codec
        self.auto_budget_s = auto_budget_s
        tp = self.runner.tp
        self.streamer = KVStreamer(0, tp.size if tp else 1, self.model_config.num_kv_heads, self.runner.kv_cache,
                                   self._on_transfer_result, link_gbps, transfer_timeout_s)
        self.targets: dict[str, str] = {}          # request id -> decode instance name
        self.levels: dict[str, str] = {}           # request id -> codec level of its transfer
        self.handoffs: dict[str, Request] = {}     # first token out, KV in flight, blocks held
        self.call_on_loop: Callable[[Callable[[], None]], Any] = lambda fn: fn()

    def _control(self, key: str, item: dict[str, Any]) -> None:
        """Tell the other TP ranks (no-op at TP 1)."""
        add = getattr(self.runner, "add_control", None)
        if add is not None:
            add(key, item)

    # ---- control calls (run on the loop thread) ------------------------------------------------

    def connect(self, peers: dict[str, dict[str, Any]]) -> None:
        """peers: decode instance -> {"tp": d, "addresses": [(host, port) per rank]}."""
        self.streamer.connect(peers)

    def add(self, spec: dict[str, Any], decode_target: str) -> None:
        now = self.clock()
        try:
            if not self.streamer.knows(decode_target):
                raise ValueError(f"no KV channel to decode instance {decode_target!r}")
            req = request_from_spec(spec)
            req.prompt_token_ids = self.tokenize(req.prompt_token_ids)
            self.scheduler.add(req)
        except ValueError as exc:
            self.emit({"id": spec.get("id"), "kind": "failed", "t": now, "reason": str(exc)})
            return
        self.targets[req.request_id] = decode_target

    def retry_transfer(self, request_id: str, decode_target: str) -> None:
        req = self.handoffs.get(request_id)
        if req is None or not self.streamer.knows(decode_target):
            self.emit({"id": request_id, "kind": "failed", "t": self.clock(),
                       "reason": f"cannot retry the KV transfer to {decode_target!r}"})
            self.drop(request_id)
            return
        self.targets[request_id] = decode_target
        item = self._begin(req)
        self._control("resend", item)
        flush = getattr(self.runner, "flush_control", None)
        if flush is not None:
            flush()
        for layer in range(self.model_config.num_layers):
            self.streamer.send_layer(request_id, decode_target, layer, req.block_table, req.num_prompt_tokens)
        self.streamer.done(request_id, decode_target, req.output_token_ids[0], self._event_times(req))

    def drop(self, request_id: str) -> None:
        req = self.handoffs.pop(request_id, None)
        self.targets.pop(request_id, None)
        self.levels.pop(request_id, None)
        if req is not None and req.block_table:
            self.blocks.free(req.block_table)
            req.block_table = []

    def abort(self, request_id: str) -> Request | None:
        target = self.targets.get(request_id)
        if request_id in self.handoffs and target is not None:
            self._abort_transfer(request_id, target, "aborted by the client")
        self.drop(request_id)
        return super().abort(request_id)

    def stats(self) -> dict[str, int]:
        return {**super().stats(), "handoffs": len(self.handoffs)}

    def close(self) -> None:
        self.streamer.close()

    # ---- the step's hooks ----------------------------------------------------------------------

    def _layer_hook(self, batch: ScheduledBatch) -> Callable[[int], None] | None:
        finishing = [s.request for s in batch.prefills if s.samples]
        if not finishing:
            return None
        for req in finishing:
            self._control("stream", self._begin(req))
        on_cuda = self.runner.device.type == "cuda"

        def on_layer_done(layer: int) -> None:
            ready = None
            if on_cuda:  # the layer is only enqueued; the channel waits for it on a side stream
                ready = torch.cuda.Event()
                ready.record()
            for req in finishing:
                self.streamer.send_layer(req.request_id, self.targets[req.request_id], layer, req.block_table,
                                         req.num_prompt_tokens, ready)
        return on_layer_done

    def _accept_token(self, req: Request, token: int, now: float) -> bool:
        rid = req.request_id
        target = self.targets[rid]
        if super()._accept_token(req, token, now):
            self._abort_transfer(rid, target, f"finished on the prefill instance ({req.finish_reason})")
            self.targets.pop(rid, None)
            return True
        self.scheduler.running.remove(req)   # leaves the scheduler; keeps its blocks until the ack
        self.handoffs[rid] = req
        self.streamer.done(rid, target, token, self._event_times(req))
        return False

    # ---- the transfer --------------------------------------------------------------------------

    def _begin(self, req: Request) -> dict[str, Any]:
        """Open the request on this rank's channels; returns what the other ranks need."""
        rid, target = req.request_id, self.targets[req.request_id]
        level = self.codec
        if level == "auto":
            raw_bytes = req.num_prompt_tokens * self.model_config.kv_bytes_per_token(self.config.dtype)
            level = choose_level(raw_bytes, self.streamer.control_channel(target).bandwidth.bytes_per_s,
                                 self.auto_budget_s, rates=coding_rates(self.runner.device),
                                 num_layers=self.model_config.num_layers)
        self.levels[rid] = level
        spec = request_to_spec(req)
        spec["events"] = {}  # the prefill instance reports its own events to the front end
        self.streamer.begin(rid, target, spec, req.num_prompt_tokens, level)
        return {"id": rid, "decode": target, "blocks": list(req.block_table), "num_tokens": req.num_prompt_tokens,
                "level": level}

    def _abort_transfer(self, rid: str, target: str, reason: str) -> None:
        self.streamer.abort(rid, target, reason)
        self._control("abort", {"id": rid, "decode": target, "reason": reason})

    def _event_times(self, req: Request) -> dict[str, float]:
        return {e.value: t for e, t in req.events.items()}

    def _on_transfer_result(self, request_id: str, ok: bool, reason: str | None, stats: dict[str, Any]) -> None:
        """Called on a channel thread; the bookkeeping runs on the loop thread."""
        self.call_on_loop(lambda: self._transfer_finished(request_id, ok, reason, stats))

    def _transfer_finished(self, request_id: str, ok: bool, reason: str | None, stats: dict[str, Any]) -> None:
        req = self.handoffs.get(request_id)
        if req is None:
            return
        now = self.clock()
        if ok:
            req.record(LifecycleEvent.KV_SENT, now)
            self.emit({"id": request_id, "kind": "kv_sent", "t": now, "level": self.levels.get(request_id), **stats})
            self.drop(request_id)
            req.status = RequestStatus.FINISHED
        else:
            self.emit({"id": request_id, "kind": "transfer_failed", "t": now, "reason": reason,
                       "decode": self.targets.get(request_id)})
