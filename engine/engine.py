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
                 clock: Callable[[], float] = time.time) -> None:
        if policy not in SCHEDULERS:
            raise RequestError(f"policy={policy!r}: choose one of {sorted(SCHEDULERS)}")
        self.model_config = model_config
        self.config = config
        self.tokenizer = tokenizer
        self.clock = clock
        self.runner = ModelRunner(model_config, config, weights)
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size)
        self.scheduler: Scheduler = SCHEDULERS[policy](scheduler_config_for(model_config, config), self.blocks)
        self._ids = itertools.count()
        self.eos_token_ids = tuple(model_config.eos_token_ids)

    @classmethod
    def from_source(cls, source: ModelSource, config: EngineConfig, policy: str = "continuous") -> "LLMEngine":
        return cls(source.model_config(), config, policy, source.state_dict(), source.tokenizer())

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
            req.record(LifecycleEvent.ABORTED, self.clock())
        return req

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Run one iteration; returns the requests that finished in it."""
        batch = self.scheduler.schedule(self.clock())
        if batch.is_empty:
            return []
        tokens = self.runner.execute(batch)
        return self._update(batch, tokens, self.clock())

    def _update(self, batch: ScheduledBatch, tokens: list[int | None], now: float) -> list[Request]:
        self.scheduler.on_step_done(batch)
        finished = []
        for s, token in zip(batch.seqs, tokens):
            if token is None:
                continue
            req = s.request
            req.append_token(token, now)
            reason = stop_reason(req, self.eos_token_ids, self.scheduler.config.max_model_len, self.tokenizer)
            if reason is not None:
                self.scheduler.finish(req, RequestStatus.FINISHED, reason)
                req.record(LifecycleEvent.FINISHED, now)
                finished.append(req)
        return finished

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | None = None) -> list[Request]:
        reqs = [self.add_request(p, params) for p in prompts]
        while self.has_unfinished:
            self.step()
        return reqs
