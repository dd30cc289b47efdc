"""A prefill instance's request story:

    add(spec, decode target) -> waiting -> prefill chunk(s)                       PREFILL_START
      -> final chunk: as each layer finishes, its KV is queued on the channel to the decode
         instance (encoding and sending overlap the remaining layers)
      -> first token sampled                                                     FIRST_TOKEN
           stops already (EOS, max_tokens=1)? finished here; the channel is told to abort
           otherwise: `done` goes out; the request leaves the scheduler but keeps its blocks
      -> ack from the decode side: blocks freed                                  KV_SENT
         failure: reported (`transfer_failed`), blocks kept for `retry_transfer` to another
         decode instance, or freed by `drop`
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from engine.engine import LLMEngine
from engine.request import LifecycleEvent, Request, RequestStatus
from engine.request_spec import request_from_spec, request_to_spec
from engine.scheduler import ScheduledBatch
from kernels.reference import gather_kv_blocks
from kvtransfer.codec import choose_level
from kvtransfer.payload import layout_of
from kvtransfer.sender import KVSender


class PrefillWorker(LLMEngine):
    def __init__(self, *args: Any, name: str = "prefill-0", codec: str = "raw", link_gbps: float | None = None,
                 transfer_timeout_s: float = 30.0, auto_budget_s: float = 0.1, **kwargs: Any) -> None:
        super().__init__(*args, policy="prefill", **kwargs)
        self.name = name
        self.codec = codec
        self.link_gbps = link_gbps
        self.transfer_timeout_s = transfer_timeout_s
        self.auto_budget_s = auto_budget_s
        self.channels: dict[str, KVSender] = {}
        self.targets: dict[str, str] = {}          # request id -> decode instance name
        self.handoffs: dict[str, Request] = {}     # first token out, KV in flight, blocks held
        self.layout = layout_of(self.model_config.num_layers, self.model_config.num_kv_heads,
                                self.model_config.head_dim, self.config.dtype)
        self.call_on_loop: Callable[[Callable[[], None]], Any] = lambda fn: fn()

    # ---- control calls (run on the loop thread) ------------------------------------------------

    def connect(self, peers: dict[str, tuple[str, int]]) -> None:
        for peer, address in peers.items():
            if peer not in self.channels:
                self.channels[peer] = KVSender(peer, tuple(address), self._on_transfer_result,
                                               self.link_gbps, self.transfer_timeout_s)

    def add(self, spec: dict[str, Any], decode_target: str) -> None:
        now = self.clock()
        try:
            if decode_target not in self.channels:
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
        if req is None or decode_target not in self.channels:
            self.emit({"id": request_id, "kind": "failed", "t": self.clock(),
                       "reason": f"cannot retry the KV transfer to {decode_target!r}"})
            self.drop(request_id)
            return
        self.targets[request_id] = decode_target
        self._begin(req)
        for layer in range(self.model_config.num_layers):
            self._send_layer(req, layer, None)
        self.channels[decode_target].done(request_id, req.output_token_ids[0], self._event_times(req))

    def drop(self, request_id: str) -> None:
        req = self.handoffs.pop(request_id, None)
        self.targets.pop(request_id, None)
        if req is not None and req.block_table:
            self.blocks.free(req.block_table)
            req.block_table = []

    def abort(self, request_id: str) -> Request | None:
        target = self.targets.get(request_id)
        if request_id in self.handoffs and target in self.channels:
            self.channels[target].abort(request_id, "aborted by the client")
        self.drop(request_id)
        return super().abort(request_id)

    def stats(self) -> dict[str, int]:
        return {**super().stats(), "handoffs": len(self.handoffs)}

    # ---- the step's hooks ----------------------------------------------------------------------

    def _layer_hook(self, batch: ScheduledBatch) -> Callable[[int], None] | None:
        finishing = [s.request for s in batch.prefills if s.samples]
        if not finishing:
            return None
        for req in finishing:
            self._begin(req)
        on_cuda = self.runner.device.type == "cuda"

        def on_layer_done(layer: int) -> None:
            ready = None
            if on_cuda:  # the layer is only enqueued; the channel waits for it to finish
                ready = torch.cuda.Event()
                ready.record()
            for req in finishing:
                self._send_layer(req, layer, ready)
        return on_layer_done

    def _accept_token(self, req: Request, token: int, now: float) -> bool:
        channel = self.channels[self.targets[req.request_id]]
        if super()._accept_token(req, token, now):
            channel.abort(req.request_id, f"finished on the prefill instance ({req.finish_reason})")
            self.targets.pop(req.request_id, None)
            return True
        self.scheduler.running.remove(req)   # leaves the scheduler; keeps its blocks until the ack
        self.handoffs[req.request_id] = req
        channel.done(req.request_id, token, self._event_times(req))
        return False

    # ---- the channel -------------------------------------------------------------------------

    def _begin(self, req: Request) -> None:
        channel = self.channels[self.targets[req.request_id]]
        level = self.codec
        if level == "auto":
            raw_bytes = req.num_prompt_tokens * self.model_config.kv_bytes_per_token(self.config.dtype)
            level = choose_level(raw_bytes, channel.bandwidth.bytes_per_s, self.auto_budget_s)
        spec = request_to_spec(req)
        spec["events"] = {}  # the prefill instance reports its own events to the front end
        channel.begin(req.request_id, spec, self.layout, level, req.num_prompt_tokens)

    def _send_layer(self, req: Request, layer: int, ready: Any) -> None:
        k_cache, v_cache = self.runner.kv_cache.layer(layer)
        block_ids = torch.tensor(req.block_table, dtype=torch.int64, device=k_cache.device)
        num_tokens = req.num_prompt_tokens

        def gather() -> tuple[torch.Tensor, torch.Tensor]:
            if ready is not None:
                ready.synchronize()
            k, v = gather_kv_blocks(k_cache, v_cache, block_ids, num_tokens)
            return k.cpu(), v.cpu()
        self.channels[self.targets[req.request_id]].send_layer(req.request_id, layer, gather)

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
            self.emit({"id": request_id, "kind": "kv_sent", "t": now, **stats})
            self.drop(request_id)
            req.status = RequestStatus.FINISHED
        else:
            self.emit({"id": request_id, "kind": "transfer_failed", "t": now, "reason": reason,
                       "decode": self.targets.get(request_id)})
