"""The colocated engine: one instance that does both phases.

    add_request -> [waiting] --schedule--> [running: prefill (chunks) -> decode] --stop--> finished

`step()` is schedule -> execute -> update; the disaggregated workers reuse the same pieces
(scheduler building blocks, ModelRunner, stop rules) with their own step.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable

from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig
from engine.errors import RequestError
from engine.model_runner import ModelRunner
from engine.request import LifecycleEvent, Request, RequestStatus, SamplingParams
from engine.scheduler import SCHEDULERS, ScheduledBatch, Scheduler, SchedulerConfig
from engine.stopping import stop_reason
from engine.weights import ModelSource


def scheduler_config_for(model_config: ModelConfig, config: EngineConfig) -> SchedulerConfig:
    max_len = min(config.max_model_len or model_config.max_position_embeddings,
                  model_config.max_position_embeddings)
    return SchedulerConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                           max_model_len=max_len, chunk_size=config.extra.get("chunk_size"))


class LLMEngine:
    def __init__(self, model_config: ModelConfig, config: EngineConfig, policy: str = "continuous",
                 weights: dict[str, Any] | None = None, tokenizer: Any = None,
                 clock: Callable[[], float] = time.time,
                 emit: Callable[[dict[str, Any]], None] | None = None,
                 runner: ModelRunner | None = None) -> None:
        if policy not in SCHEDULERS:
            raise RequestError(f"policy={policy!r}: choose one of {sorted(SCHEDULERS)}")
        self.model_config = model_config
        self.config = config
        self.tokenizer = tokenizer
        self.clock = clock
        # A tensor-parallel instance passes its rank-0 runner in; otherwise a single device.
        self.runner = runner or ModelRunner(model_config, config, weights)
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size)
        sched_config = scheduler_config_for(model_config, config)
        self.scheduler: Scheduler = SCHEDULERS[policy](sched_config, self.blocks)
        if self.runner.graphs is not None and config.capture_graphs_at_start and policy != "prefill":
            # before serving: a capture inside a live step stalls the whole batch
            self.runner.graphs.capture_all(min(sched_config.max_model_len, self.runner.num_blocks * config.block_size))
        self._ids = itertools.count()
        self.num_steps = 0  # steps that ran a batch
        self.eos_token_ids = tuple(model_config.eos_token_ids)
        # Lifecycle events for whoever drives this engine (the cluster front end); plain dicts.
        self.emit: Callable[[dict[str, Any]], None] = emit or (lambda event: None)

    @classmethod
    def from_source(cls, source: ModelSource, config: EngineConfig, policy: str = "continuous",
                    **kwargs: Any) -> "LLMEngine":
        return cls(source.model_config(), config, policy, source.state_dict(), source.tokenizer(), **kwargs)

    # ---- requests ------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("prompt: text needs a tokenizer; this model has dummy weights, send token ids")
            return self.tokenizer.encode(prompt)
        if not all(isinstance(t, int) and 0 <= t < self.model_config.vocab_size for t in prompt):
            raise RequestError(f"prompt: token ids must be ints in [0, {self.model_config.vocab_size})")
        return list(prompt)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> Request:
        req = Request(request_id or f"req-{next(self._ids)}", self.tokenize(prompt), params or SamplingParams(),
                      self.clock() if arrival_time is None else arrival_time)
        self.scheduler.add(req)
        return req

    def abort(self, request_id: str) -> Request | None:
        req = self.scheduler.abort(request_id)
        if req is not None:
            now = self.clock()
            req.record(LifecycleEvent.ABORTED, now)
            self.emit({"id": request_id, "kind": "aborted", "t": now})
        return req

    def stats(self) -> dict[str, int]:
        return {"num_blocks": self.blocks.num_blocks, "free_blocks": self.blocks.num_free,
                "waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                "queued_prompt_tokens": self.scheduler.queued_prompt_tokens}

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Run one iteration; returns the requests that finished in it."""
        batch = self.scheduler.schedule(self.clock())
        if batch.is_empty:
            return []
        self.num_steps += 1
        self._on_scheduled(batch)
        tokens = self.runner.execute(batch, self._layer_hook(batch))
        return self._update(batch, tokens, self.clock())

    def _on_scheduled(self, batch: ScheduledBatch) -> None:
        """A step is about to run: report requests whose prefill starts now."""
        for s in batch.prefills:
            if s.start == 0 and not s.request.output_token_ids:
                t = s.request.events[LifecycleEvent.PREFILL_START]
                self.emit({"id": s.request.request_id, "kind": "prefill_start", "t": t})

    def _layer_hook(self, batch: ScheduledBatch) -> Callable[[int], None] | None:
        """Hook: a callback run as each layer's KV lands in the cache (prefill streams it)."""
        return None

    def _update(self, batch: ScheduledBatch, tokens: list[int | None], now: float) -> list[Request]:
        self.scheduler.on_step_done(batch)
        finished = []
        for s, token in zip(batch.seqs, tokens):
            if token is not None and self._accept_token(s.request, token, now):
                finished.append(s.request)
        return finished

    def _accept_token(self, req: Request, token: int, now: float) -> bool:
        """Append a sampled token; finish the request if it should stop. True if it finished."""
        req.append_token(token, now)
        self.emit({"id": req.request_id, "kind": "token", "t": now, "token": token})
        reason = stop_reason(req, self.eos_token_ids, self.scheduler.config.max_model_len, self.tokenizer)
        if reason is None:
            return False
        self.finish(req, RequestStatus.FINISHED, reason, now)
        return True

    def finish(self, req: Request, status: RequestStatus, reason: str, now: float) -> None:
        self.scheduler.finish(req, status, reason)
        event = LifecycleEvent.FINISHED if status == RequestStatus.FINISHED else LifecycleEvent.FAILED
        req.record(event, now)
        self.emit({"id": req.request_id, "kind": event.value, "t": now, "reason": reason})

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | None = None) -> list[Request]:
        reqs = [self.add_request(p, params) for p in prompts]
        while self.has_unfinished:
            self.step()
        return reqs
