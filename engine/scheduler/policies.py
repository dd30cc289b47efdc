"""The colocated scheduling policies, each a composition of the base building blocks."""

from __future__ import annotations

from engine.scheduler.base import ScheduledBatch, Scheduler


class ContinuousBatchingScheduler(Scheduler):
    """vLLM-style: whole-prompt prefills take priority; a step is all-prefill or all-decode."""

    def schedule(self, now: float) -> ScheduledBatch:
        batch = ScheduledBatch()
        self._schedule_prefills(self.config.max_num_batched_tokens, batch, now, chunked=False)
        if not batch.prefills:
            self._schedule_decodes(self.config.max_num_batched_tokens, batch)
        return batch


class ChunkedPrefillScheduler(Scheduler):
    """Sarathi-Serve-style: every running decode gets its token first, then prefill chunks
    fill what is left of the per-step token budget (decodes are never stalled by a prompt)."""

    def schedule(self, now: float) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_decodes(self.config.max_num_batched_tokens, batch)
        self._schedule_prefills(budget, batch, now, chunked=True)
        return batch


class PrefillOnlyScheduler(Scheduler):
    """Disaggregated prefill instance: prefill chunks under the token budget, no decodes.
    The worker takes each request out of `running` once its first token is sampled."""

    def schedule(self, now: float) -> ScheduledBatch:
        batch = ScheduledBatch()
        self._schedule_prefills(self.config.max_num_batched_tokens, batch, now, chunked=True)
        return batch


class DecodeOnlyScheduler(Scheduler):
    """Disaggregated decode instance: continuous batching of requests whose KV has landed.
    A preempted request is recomputed here (its prompt and outputs prefilled locally)."""

    def schedule(self, now: float) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_decodes(self.config.max_num_batched_tokens, batch)
        self._schedule_prefills(budget, batch, now, chunked=True)
        return batch


SCHEDULERS: dict[str, type[Scheduler]] = {
    "continuous": ContinuousBatchingScheduler,
    "chunked": ChunkedPrefillScheduler,
    "prefill": PrefillOnlyScheduler,
    "decode": DecodeOnlyScheduler,
}
