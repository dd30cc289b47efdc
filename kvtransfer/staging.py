"""Host staging for incoming KV: frames land here as they arrive, from any number of source
ranks, and move into paged blocks when the decode instance admits the request.

Staging decouples the network from block allocation: a transfer never waits for decode
memory, and a decode rank never needs block ids before the data arrives. A request is
complete when every layer from every source has landed and, on the control rank, `done` too.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class StagedFrame:
    """A run of layers from one source: local heads a:b of layers first..first+n-1."""
    first: int
    a: int
    b: int
    kv: torch.Tensor          # [n, 2, num_tokens, b - a, head_dim]; host, or the decode GPU


@dataclass
class StagedRequest:
    request_id: str
    num_tokens: int = 0
    expected_layers: int | None = None        # num_layers x sources; known once a begin arrived
    frames: list[StagedFrame] = field(default_factory=list)
    landed_layers: int = 0
    spec: dict[str, Any] | None = None        # control rank only
    done: tuple[int, dict[str, float]] | None = None
    reply: Callable[[bool, str | None], None] | None = None   # ack/nack to the prefill side
    created: float = field(default_factory=time.monotonic)

    def add(self, frame: StagedFrame) -> None:
        self.frames.append(frame)
        self.landed_layers += frame.kv.shape[0]

    def complete(self, control: bool) -> bool:
        landed = self.expected_layers is not None and self.landed_layers >= self.expected_layers
        return landed and (not control or (self.done is not None and self.spec is not None))


class StagingArea:
    def __init__(self, control: bool, on_complete: Callable[[StagedRequest], None] | None = None,
                 ttl_s: float = 120.0) -> None:
        self.control = control
        self.on_complete = on_complete
        self.ttl_s = ttl_s
        self._items: dict[str, StagedRequest] = {}
        self._announced: set[str] = set()
        self._cv = threading.Condition()

    def update(self, request_id: str, fn: Callable[[StagedRequest], None]) -> None:
        """Apply `fn` to the request's entry (created if new); fire on_complete once."""
        fire = None
        with self._cv:
            item = self._items.setdefault(request_id, StagedRequest(request_id))
            fn(item)
            if item.complete(self.control):
                self._cv.notify_all()
                if request_id not in self._announced:
                    self._announced.add(request_id)
                    fire = item
        if fire is not None and self.on_complete is not None:
            self.on_complete(fire)

    def pop(self, request_id: str) -> StagedRequest | None:
        with self._cv:
            self._announced.discard(request_id)
            return self._items.pop(request_id, None)

    def contains(self, request_id: str) -> bool:
        with self._cv:
            return request_id in self._items

    def wait_complete(self, request_id: str, timeout_s: float) -> StagedRequest | None:
        """Block until the request's frames have all landed; None on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                item = self._items.get(request_id)
                if item is not None and item.complete(self.control):
                    return item
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cv.wait(left)

    def expire(self) -> list[StagedRequest]:
        """Drop entries older than the TTL (transfers whose sender vanished)."""
        now = time.monotonic()
        with self._cv:
            old = [k for k, v in self._items.items() if now - v.created > self.ttl_s]
            return [self._items.pop(k) for k in old]

    def __len__(self) -> int:
        return len(self._items)
