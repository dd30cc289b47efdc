"""The cluster as the server's event loop sees it.

One thread (the poll thread) owns the front end: it runs every submit and abort handed to
it, calls `frontend.poll()`, and forwards each request's events to that request's asyncio
queue. Nothing else touches the front end, so it needs no lock.

    handler --submit--> [admission: 503 if no live pool, 429 at max_inflight]
        --command--> poll thread: cluster.submit(on_event) --events--> asyncio.Queue -> handler
    handler gone (client disconnected, or done) --abort--> poll thread: frontend.abort
    poll thread, request done: metrics.finished(record); forget it (the front end keeps no history)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import uuid
from typing import Any, Callable

from cluster.cluster import Cluster
from engine.request import SamplingParams
from serving.metrics import ServerMetrics
from serving.protocol import APIError

GAUGE_PERIOD_S = 0.5
log = logging.getLogger("splitserve.serving")


class ClusterClient:
    def __init__(self, cluster: Cluster, metrics: ServerMetrics, max_inflight: int, retry_after_s: float = 1.0) -> None:
        self.cluster, self.frontend, self.metrics = cluster, cluster.frontend, metrics
        self.max_inflight, self.retry_after_s = max_inflight, retry_after_s
        router = self.frontend.router
        cfg = cluster.config
        # The longest prompt + output any instance can hold (blocks x block size), within the model's context.
        blocks = [load.num_blocks for pool in (router.prefill, router.decode) for load in pool.values()]
        model_len = cfg.model.source.model_config().max_position_embeddings
        self.max_context = min([cfg.engine.max_model_len or model_len, model_len]
                               + [(b - 1) * cfg.engine.block_size for b in blocks if b])
        self.links = {f"{p}->{d}": cfg.kv_transfer.codec for p in router.prefill for d in router.decode}
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._live: set[str] = set()          # poll thread only
        self._num_inflight = 0                 # admitted and not yet done (guarded by _lock)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="splitserve-poll", daemon=True)
        self._thread.start()

    # ---- the event loop's side -------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        router = self.frontend.router
        live = [any(p.alive for p in router.prefill.values())]
        if self.frontend.disaggregated:
            live.append(any(d.alive for d in router.decode.values()))
        return all(live) and self._thread.is_alive()

    @property
    def num_inflight(self) -> int:
        return self._num_inflight

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> tuple[str, asyncio.Queue[dict[str, Any]]]:
        """Admit a request or raise 503/429; returns its id and the queue its events arrive on."""
        if not self.healthy:
            raise APIError(503, "the cluster has no live prefill or decode instance; retry later", None,
                           "service_unavailable", self.retry_after_s * 5)
        with self._lock:
            if self._num_inflight >= self.max_inflight:
                raise APIError(429, f"the server is at capacity ({self.max_inflight} requests in flight); retry later",
                               None, "rate_limit_exceeded", self.retry_after_s)
            self._num_inflight += 1
        rid = f"cmpl-{uuid.uuid4().hex[:16]}-{next(self._ids)}"
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def on_event(e: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(events.put_nowait, e)

        def start() -> None:
            try:
                self.cluster.submit(prompt_ids, params, request_id=rid, on_event=on_event)
                self._live.add(rid)
            except Exception as exc:  # a request the engine refuses: report it, free its slot
                self._release()
                on_event({"id": rid, "kind": "failed", "t": time.time(), "reason": str(exc)})
        self._commands.put(start)
        return rid, events

    def abort(self, rid: str) -> None:
        self._commands.put(lambda: self.frontend.abort(rid))

    def instance_stats(self) -> dict[str, dict[str, Any]]:
        """Blocking (a Ray call per instance): run it off the event loop."""
        return self.cluster.instance_stats()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.cluster.shutdown()

    # ---- the poll thread ---------------------------------------------------------------------------

    def _release(self) -> None:
        with self._lock:
            self._num_inflight -= 1

    def _run(self) -> None:
        next_gauges = 0.0
        while not self._stop.is_set():
            while True:
                try:
                    self._commands.get_nowait()()
                except queue.Empty:
                    break
            try:
                self.frontend.poll(0.01 if self._live else 0.05)
                self._forget_done()
            except Exception:  # keep serving; a dead instance shows up through the router instead
                log.exception("poll failed")
                time.sleep(0.1)
            if time.monotonic() >= next_gauges:
                self._refresh_gauges()
                next_gauges = time.monotonic() + GAUGE_PERIOD_S

    def _forget_done(self) -> None:
        done = [rid for rid in self._live if self.frontend.requests[rid].done]
        for rid in done:
            t = self.frontend.requests[rid]
            link = f"{t.prefill}->{t.decode}" if self.frontend.disaggregated else None
            self.metrics.finished(self.frontend.record(rid), link)
            del self.frontend.requests[rid]
            self._live.discard(rid)
            self._release()

    def _refresh_gauges(self) -> None:
        stages = {"pending": 0, "prefill": 0, "transfer": 0, "decode": 0}
        for t in self.frontend.requests.values():
            if t.state in stages:
                stages[t.state] += 1
        router = self.frontend.router
        blocks = {load.name: (load.free_blocks, load.num_blocks)
                  for pool in (router.prefill, router.decode) for load in pool.values() if load.alive}
        self.metrics.cluster_state(stages, blocks, self.links)
