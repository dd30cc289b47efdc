"""The front end's decisions, against a fake instance pool (no engine, no Ray): dispatch and
backpressure, a prompt no decode instance can hold, transfer retries, dead instances."""

from __future__ import annotations

from typing import Any

from cluster.frontend import Frontend
from cluster.router import Router
from engine.request import SamplingParams


class FakePool:
    """Records calls; the test feeds events and deaths."""

    def __init__(self, roles: dict[str, str]) -> None:
        self.roles = roles
        self.calls: list[tuple[str, str, tuple[Any, ...]]] = []
        self.events: list[dict[str, Any]] = []
        self.dead: dict[str, str] = {}

    def names(self, role: str) -> list[str]:
        return [n for n, r in self.roles.items() if r == role]

    def call(self, name: str, method: str, *args: Any) -> None:
        self.calls.append((name, method, args))

    def poll(self, timeout: float):
        events, self.events = self.events, []
        dead, self.dead = self.dead, {}
        return events, {}, dead


def make(max_queued_tokens: int = 1000, decode_blocks: int = 100) -> tuple[Frontend, FakePool]:
    pool = FakePool({"p0": "prefill", "d0": "decode", "d1": "decode"})
    router = Router(["p0"], ["d0", "d1"], block_size=16, max_queued_tokens=max_queued_tokens,
                    num_blocks={"p0": 100, "d0": decode_blocks, "d1": decode_blocks})
    return Frontend(pool, router, disaggregated=True, max_retries=1, clock=lambda: 0.0), pool


def token(rid: str, inst: str, tok: int = 5) -> dict[str, Any]:
    return {"id": rid, "kind": "token", "t": 1.0, "token": tok, "instance": inst}


def test_backpressure_holds_requests_until_the_prefill_queue_drains():
    fe, pool = make(max_queued_tokens=150)
    fe.submit("a", list(range(1, 101)), SamplingParams(max_tokens=4))
    fe.submit("b", list(range(1, 101)), SamplingParams(max_tokens=4))
    assert [c[2][0]["id"] for c in pool.calls if c[1] == "add"] == ["a"]
    assert list(fe.pending) == ["b"]
    pool.events.append(token("a", "p0"))          # a's prefill is done: its tokens leave the queue
    fe.poll()
    assert [c[2][0]["id"] for c in pool.calls if c[1] == "add"] == ["a", "b"]


def test_prompt_no_decode_instance_can_hold_fails_instead_of_waiting():
    fe, pool = make(decode_blocks=4)
    fe.submit("big", list(range(1, 200)), SamplingParams(max_tokens=4))
    t = fe.requests["big"]
    assert t.state == "failed" and "decode.kv_blocks" in t.reason
    assert not fe.pending and not pool.calls


def test_failed_transfer_is_retried_once_elsewhere_then_fails():
    fe, pool = make()
    fe.submit("r", [1, 2, 3], SamplingParams(max_tokens=4))
    first = fe.requests["r"].decode
    pool.events += [token("r", "p0"), {"id": "r", "kind": "transfer_failed", "t": 1.0, "reason": "nack"}]
    fe.poll()
    retry = [c for c in pool.calls if c[1] == "retry_transfer"]
    assert len(retry) == 1 and retry[0][2][1] != first
    pool.events.append({"id": "r", "kind": "transfer_failed", "t": 2.0, "reason": "nack again"})
    fe.poll()
    t = fe.requests["r"]
    assert t.state == "failed" and "after 1 retries" in t.reason
    assert ("p0", "drop", ("r",)) in pool.calls   # the prefill side frees the held KV


def test_dead_decode_fails_its_running_requests_and_spares_others():
    fe, pool = make()
    fe.submit("x", [1, 2, 3], SamplingParams(max_tokens=4))
    fe.submit("y", [1, 2, 3], SamplingParams(max_tokens=4))
    dx = fe.requests["x"].decode
    pool.events += [token("x", "p0"), {"id": "x", "kind": "kv_received", "t": 1.0, "instance": dx}]
    fe.poll()
    pool.dead[dx] = "killed"
    fe.poll()
    assert fe.requests["x"].state == "failed" and dx in fe.requests["x"].reason
    assert not fe.requests["y"].done   # still prefilling; its transfer will go elsewhere
