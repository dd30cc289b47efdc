"""A request's state and story.

Lifecycle (each transition stamps a `LifecycleEvent` time; metrics come from these stamps):

    ARRIVED -> PREFILL_START -> FIRST_TOKEN --(disaggregated only)--> KV_SENT -> KV_RECEIVED
        -> DECODE_START -> FINISHED
    any state -> FAILED (with a reason) | ABORTED

In the colocated engine a request goes ARRIVED -> PREFILL_START -> FIRST_TOKEN -> FINISHED
without leaving its instance. Times are seconds on the clock the engine was given (wall clock
in the runtime, virtual time in the simulator).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.errors import RequestError


class LifecycleEvent(str, enum.Enum):
    ARRIVED = "arrived"
    PREFILL_START = "prefill_start"
    FIRST_TOKEN = "first_token"
    KV_SENT = "kv_sent"
    KV_RECEIVED = "kv_received"
    DECODE_START = "decode_start"
    FINISHED = "finished"
    FAILED = "failed"
    ABORTED = "aborted"


class RequestStatus(str, enum.Enum):
    WAITING = "waiting"      # queued, no KV computed (or preempted and reset)
    RUNNING = "running"      # holds KV blocks; prefilling or decoding
    FINISHED = "finished"
    FAILED = "failed"
    ABORTED = "aborted"

    @property
    def is_done(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.FAILED, RequestStatus.ABORTED)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0           # 0 means greedy
    top_k: int = 0                     # 0 means off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise RequestError(f"max_tokens={self.max_tokens!r}: must be an integer >= 1")
        if self.temperature < 0:
            raise RequestError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise RequestError(f"top_k={self.top_k}: must be >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p={self.top_p}: must be in (0, 1]")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0        # tokens whose KV is in this instance's cache
    block_table: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None    # "stop", "length", "abort", or a failure reason
    events: dict[LifecycleEvent, float] = field(default_factory=dict)
    last_token_time: float | None = None

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise RequestError("prompt: is empty; send at least one token of text")
        self.events.setdefault(LifecycleEvent.ARRIVED, self.arrival_time)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def in_prefill(self) -> bool:
        """True until the KV of every prompt token is computed (prefill or recompute)."""
        return self.num_computed_tokens < self.num_tokens - (1 if self.output_token_ids else 0)

    def record(self, event: LifecycleEvent, now: float) -> None:
        self.events.setdefault(event, now)

    def append_token(self, token_id: int, now: float) -> None:
        if not self.output_token_ids:
            self.record(LifecycleEvent.FIRST_TOKEN, now)
        self.output_token_ids.append(token_id)
        self.last_token_time = now
