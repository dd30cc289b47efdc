"""What every scheduler shares: the queues, admission checks, and the two building blocks
(schedule decodes, schedule prefills) that each policy composes differently.

Invariants (pure Python, no device calls, so the simulator imports this unchanged):
- a live request is in exactly one of `waiting` (no KV held) or `running` (holds blocks for
  at least `num_computed_tokens` tokens);
- `schedule()` never exceeds `max_num_seqs` sequences nor `max_num_batched_tokens` tokens,
  except that one prompt longer than the budget may run alone when chunking is off;
- blocks are returned exactly once: on finish, abort or preemption.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.errors import OutOfBlocksError, RequestError
from engine.request import LifecycleEvent, Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    chunk_size: int | None = None  # largest prefill chunk per request; None: the token budget


@dataclass
class ScheduledSeq:
    request: Request
    num_new_tokens: int
    start: int  # request.num_computed_tokens when scheduled: first position computed this step

    @property
    def samples(self) -> bool:
        """This step computes the request's last known token, so it produces the next one."""
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclass
class ScheduledBatch:
    """The plain description of one step handed to the model runner (prefills first)."""

    prefills: list[ScheduledSeq] = field(default_factory=list)
    decodes: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def seqs(self) -> list[ScheduledSeq]:
        return self.prefills + self.decodes

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.prefills) + len(self.decodes)

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler(ABC):
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    # ---- queue management ----------------------------------------------------------------

    def check_fits(self, request: Request) -> None:
        """Refuse, with the field and the fix, a request this instance could never serve."""
        limit = self.config.max_model_len
        if request.num_prompt_tokens >= limit:
            raise RequestError(f"prompt: {request.num_prompt_tokens} tokens does not fit the context of "
                               f"{limit} tokens (max_model_len); shorten the prompt")
        need = self.blocks.blocks_for(min(request.num_prompt_tokens + request.params.max_tokens, limit))
        if need > self.blocks.num_blocks:
            raise OutOfBlocksError(f"request needs {need} KV blocks but the cache has {self.blocks.num_blocks}; "
                                   "lower max_tokens or give the instance more KV memory")

    def add(self, request: Request) -> None:
        self.check_fits(request)
        self.waiting.append(request)

    def admit_running(self, request: Request) -> None:
        """A request whose KV was computed elsewhere (and landed in its blocks) joins running."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def abort(self, request_id: str) -> Request | None:
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    self._release(req)
                    req.status = RequestStatus.ABORTED
                    req.finish_reason = "abort"
                    return req
        return None

    def finish(self, request: Request, status: RequestStatus, reason: str) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._release(request)
        request.status, request.finish_reason = status, reason

    def _release(self, request: Request) -> None:
        if request.block_table:
            self.blocks.free(request.block_table)
            request.block_table = []

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def queued_prompt_tokens(self) -> int:
        return sum(r.num_uncomputed_tokens for r in self.waiting) + sum(
            r.num_uncomputed_tokens for r in self.running if r.in_prefill)

    # ---- one step ------------------------------------------------------------------------

    @abstractmethod
    def schedule(self, now: float) -> ScheduledBatch:
        """Pick the next step's work. Allocates blocks for it; never touches the device."""

    def on_step_done(self, batch: ScheduledBatch) -> None:
        """The runner computed the scheduled tokens' KV."""
        for s in batch.seqs:
            s.request.num_computed_tokens = s.start + s.num_new_tokens

    # ---- building blocks -----------------------------------------------------------------

    def _schedule_decodes(self, budget: int, batch: ScheduledBatch) -> int:
        """One token for each running request past prefill, oldest first; preempts the newest
        running request (recompute later) when blocks run out. Returns the budget left."""
        for req in [r for r in self.running if not r.in_prefill]:
            if budget <= 0 or len(batch.seqs) >= self.config.max_num_seqs:
                break
            if req not in self.running:  # preempted below to make room for an older one
                continue
            while not self.blocks.ensure_capacity(req.block_table, req.num_tokens):
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is req:
                    break
            if req in self.running:
                batch.decodes.append(ScheduledSeq(req, 1, req.num_computed_tokens))
                budget -= 1
        return budget

    def _preempt(self, req: Request, batch: ScheduledBatch) -> None:
        self.running.remove(req)
        self._release(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        batch.preempted.append(req)
        batch.decodes = [s for s in batch.decodes if s.request is not req]

    def _schedule_prefills(self, budget: int, batch: ScheduledBatch, now: float, chunked: bool) -> int:
        """Continue partial prefills, then admit waiting requests FCFS while blocks for their
        whole prompt and the budget allow. Returns the budget left."""
        chunk_cap = self.config.chunk_size or self.config.max_num_batched_tokens
        for req in [r for r in self.running if r.in_prefill]:
            if budget <= 0 or len(batch.seqs) >= self.config.max_num_seqs:
                return budget
            n = min(req.num_uncomputed_tokens, budget, chunk_cap)
            batch.prefills.append(ScheduledSeq(req, n, req.num_computed_tokens))
            budget -= n
        while self.waiting and budget > 0 and len(batch.seqs) < self.config.max_num_seqs:
            req = self.waiting[0]
            n = req.num_uncomputed_tokens
            if chunked:
                n = min(n, budget, chunk_cap)
            elif n > budget and batch.seqs:
                break  # a whole prompt must fit; an oversized one runs alone in its own step
            # Reserve the whole prompt (plus the first output token) up front so that
            # admitted requests can always finish their prefill.
            if not self.blocks.ensure_capacity(req.block_table, req.num_tokens + 1):
                break
            self.waiting.popleft()
            self.running.append(req)
            req.status = RequestStatus.RUNNING
            req.record(LifecycleEvent.PREFILL_START, now)
            batch.prefills.append(ScheduledSeq(req, n, req.num_computed_tokens))
            budget -= n
        return budget
