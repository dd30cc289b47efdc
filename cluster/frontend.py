"""The front end: admits requests, routes them, follows their lifecycle events from the
instances, retries what failed, and reports each request's record.

    submit -> pending (backpressure) -> dispatched to (prefill, decode) -> prefill_start
      -> token (first, from prefill) -> kv_sent / kv_received -> decode_start -> token*
      -> finished | failed (reason) | aborted
    transfer_failed: retried to another decode instance from the prefill's held KV
    an instance dies: requests with no token yet are re-dispatched; the others fail with a reason

It talks to instances only through the handles' `add / abort / retry_transfer / drop /
wait_events` calls, so it runs the same over Ray actors and over in-process instances.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from cluster.router import Router
from engine.metrics import RequestRecord
from engine.request import SamplingParams
from engine.request_spec import request_to_spec
from engine.request import Request


class InstancePool(Protocol):
    """How the front end reaches instances (Ray actors, or in-process for tests)."""

    def names(self, role: str) -> list[str]: ...
    def call(self, name: str, method: str, *args: Any) -> None: ...
    def poll(self, timeout: float) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], dict[str, str]]:
        """(events, load per instance, dead instances -> reason)"""
        ...


@dataclass
class Tracked:
    request: Request
    on_event: Callable[[dict[str, Any]], None] | None = None
    state: str = "pending"        # pending, prefill, transfer, decode, finished, failed, aborted
    prefill: str | None = None
    decode: str | None = None
    retries: int = 0
    failed_decodes: list[str] = field(default_factory=list)
    route: tuple[str, str | None] | None = None   # pinned (prefill, decode) instances
    first_token_s: float | None = None
    last_token_s: float | None = None
    tokens: list[int] = field(default_factory=list)
    reason: str | None = None
    kv_bytes_raw: int = 0
    kv_bytes_wire: int = 0
    events: dict[str, float] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.state in ("finished", "failed", "aborted")


class Frontend:
    def __init__(self, pool: InstancePool, router: Router, disaggregated: bool, max_retries: int = 2,
                 clock: Callable[[], float] = time.time) -> None:
        self.pool, self.router, self.disaggregated = pool, router, disaggregated
        self.max_retries = max_retries
        self.clock = clock
        self.requests: dict[str, Tracked] = {}
        self.pending: deque[str] = deque()

    # ---- requests ------------------------------------------------------------------------------

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               arrival_s: float | None = None, on_event: Callable[[dict[str, Any]], None] | None = None,
               route: tuple[str, str | None] | None = None) -> None:
        """`route` pins the request to a (prefill, decode) pair instead of the router's choice."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = Request(request_id, list(prompt_token_ids), params, self.clock() if arrival_s is None else arrival_s)
        self.requests[request_id] = Tracked(req, on_event, route=route)
        self.pending.append(request_id)
        self._dispatch()

    def abort(self, request_id: str) -> None:
        t = self.requests.get(request_id)
        if t is None or t.done:
            return
        for name in {t.prefill, t.decode} - {None}:
            if self.router.alive(name):  # type: ignore[arg-type]
                self.pool.call(name, "abort", request_id)  # type: ignore[arg-type]
        if request_id in self.pending:
            self.pending.remove(request_id)
        self._end(t, "aborted", "aborted by the client")

    @property
    def num_unfinished(self) -> int:
        return sum(not t.done for t in self.requests.values())

    def _dispatch(self) -> None:
        while self.pending:
            t = self.requests[self.pending[0]]
            n = t.request.num_prompt_tokens
            if t.route is not None and not t.failed_decodes:
                prefill, decode = t.route
            else:
                prefill = self.router.pick_prefill(n)
                decode = self.router.pick_decode(prefill, n, tuple(t.failed_decodes)) if (
                    prefill and self.disaggregated) else None
            if self.disaggregated and self.router.blocks_for(n) > self.router.largest_decode_blocks() > 0:
                self.pending.popleft()
                self._end(t, "failed", f"prompt: {n} tokens need {self.router.blocks_for(n)} KV blocks but the largest "
                                       f"decode instance has {self.router.largest_decode_blocks()}; shorten the "
                                       "prompt or raise decode.kv_blocks / memory_fraction")
                continue
            if prefill is None or (self.disaggregated and decode is None):
                if not any(p.alive for p in self.router.prefill.values()) or (
                        self.disaggregated and not any(d.alive for d in self.router.decode.values())):
                    self.pending.popleft()
                    self._end(t, "failed", "no live instance can serve this request")
                    continue
                return  # backpressure: wait for room
            self.pending.popleft()
            t.state, t.prefill, t.decode = "prefill", prefill, decode
            self.router.dispatched(prefill, decode, n)
            self.pool.call(prefill, "add", request_to_spec(t.request), decode)

    # ---- events --------------------------------------------------------------------------------

    def poll(self, timeout: float = 0.05) -> None:
        events, loads, dead = self.pool.poll(timeout)
        for name, load in loads.items():
            self.router.report(name, load["free_blocks"], load["num_blocks"])
        for name, reason in dead.items():
            self._instance_died(name, reason)
        for e in events:
            t = self.requests.get(e.get("id"))
            if t is not None and not t.done:
                self._on_event(t, e)
        self._dispatch()

    def _on_event(self, t: Tracked, e: dict[str, Any]) -> None:
        kind, now = e["kind"], e["t"]
        if kind not in ("token",):
            t.events.setdefault(kind, now)
        if kind == "token":
            if t.first_token_s is None:
                t.first_token_s = now
                self.router.prefilled(t.prefill, t.request.num_prompt_tokens)  # type: ignore[arg-type]
                t.state = "transfer" if self.disaggregated else "decode"
            t.tokens.append(e["token"])
            t.last_token_s = now
        elif kind == "kv_sent":
            t.kv_bytes_raw, t.kv_bytes_wire = e.get("kv_bytes_raw", 0), e.get("kv_bytes_wire", 0)
        elif kind == "kv_received":
            t.state = "decode"
            t.decode = e["instance"]
            self.router.landed(t.decode, t.request.num_prompt_tokens)
        elif kind == "transfer_failed":
            self._retry_transfer(t, e.get("reason") or "transfer failed")
        elif kind in ("finished", "failed", "aborted"):
            if kind == "finished" and t.first_token_s is None:
                return
            self._end(t, kind, e.get("reason"))
            if t.first_token_s is None and t.prefill:
                self.router.prefilled(t.prefill, t.request.num_prompt_tokens)
        if t.on_event is not None:
            t.on_event(e)

    def _retry_transfer(self, t: Tracked, reason: str) -> None:
        failed = t.decode
        if failed is not None:
            self.router.landed(failed, t.request.num_prompt_tokens)
            t.failed_decodes.append(failed)
        target = self.router.pick_decode(t.prefill, t.request.num_prompt_tokens, tuple(t.failed_decodes))  # type: ignore[arg-type]
        if t.retries >= self.max_retries or target is None or not self.router.alive(t.prefill):  # type: ignore[arg-type]
            if self.router.alive(t.prefill):  # type: ignore[arg-type]
                self.pool.call(t.prefill, "drop", t.request.request_id)  # type: ignore[arg-type]
            self._end(t, "failed", f"{reason} (after {t.retries} retries)")
            return
        t.retries += 1
        t.decode = target
        self.router.promise(target, t.request.num_prompt_tokens)
        self.pool.call(t.prefill, "retry_transfer", t.request.request_id, target)  # type: ignore[arg-type]

    def _instance_died(self, name: str, reason: str) -> None:
        self.router.mark_dead(name)
        for t in self.requests.values():
            if t.done or name not in (t.prefill, t.decode):
                continue
            if name == t.decode and t.state in ("prefill", "transfer"):
                continue  # its prefill instance finds the channel broken and retries the transfer
            if t.first_token_s is None and t.retries < self.max_retries:
                # nothing reached the client yet: run it again elsewhere
                t.retries += 1
                t.state, t.prefill, t.decode = "pending", None, None
                t.events = {}
                self.pending.appendleft(t.request.request_id)
                continue
            self._end(t, "failed", f"instance {name} died mid-request: {reason}")

    def _end(self, t: Tracked, state: str, reason: str | None) -> None:
        t.state, t.reason = state, reason
        t.events.setdefault(state, self.clock())
        if t.on_event is not None and state != "finished":
            t.on_event({"id": t.request.request_id, "kind": state, "t": self.clock(), "reason": reason})

    # ---- results -------------------------------------------------------------------------------

    def record(self, request_id: str) -> RequestRecord:
        t = self.requests[request_id]
        transfer = None
        if "kv_received" in t.events and t.first_token_s is not None:
            transfer = t.events["kv_received"] - t.first_token_s
        return RequestRecord(
            id=request_id, prompt_tokens=t.request.num_prompt_tokens, output_tokens=len(t.tokens),
            arrival_s=t.request.arrival_time, first_token_s=t.first_token_s, last_token_s=t.last_token_s,
            status=t.state if t.done else "unfinished", finish_reason=t.reason,
            prefill_instance=t.prefill, decode_instance=t.decode if self.disaggregated else t.prefill,
            kv_bytes_raw=t.kv_bytes_raw, kv_bytes_wire=t.kv_bytes_wire, kv_transfer_s=transfer,
            events=dict(t.events))

    def records(self) -> list[RequestRecord]:
        return [self.record(rid) for rid in self.requests]
