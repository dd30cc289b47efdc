"""What the server measures, recorded twice: into Ray's metrics API (`ray.util.metrics`,
exported by each node's Prometheus endpoint, names prefixed `ray_`) and into a plain snapshot
served as JSON at `/metrics`, so a test or a human can read it without a Prometheus.

    splitserve_requests{endpoint, status}       counter  ok | invalid | rejected | aborted | failed
    splitserve_tokens{kind}                      counter  prompt | completion
    splitserve_ttft_s / splitserve_tpot_s        histogram, seconds (DESIGN.md's definitions)
    splitserve_kv_transfer_s                     histogram, first token -> KV landed on decode, seconds
    splitserve_queue_depth{stage}                gauge    pending | prefill | transfer | decode (requests)
    splitserve_kv_blocks{instance, state}        gauge    used | free
    splitserve_kv_bytes{link, kind}              counter  raw | wire bytes per prefill->decode link
    splitserve_kv_codec{link, level}             gauge    1 for the link's codec level
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from typing import Any

from engine.metrics import RequestRecord, percentile

LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]
KEEP_SAMPLES = 10_000  # recent latencies kept for the JSON percentiles


class _RayMetrics:
    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.requests = Counter("splitserve_requests", "HTTP requests by outcome", ("endpoint", "status"))
        self.tokens = Counter("splitserve_tokens", "prompt and completion tokens", ("kind",))
        self.latency = {name: Histogram(f"splitserve_{name}", f"{name} in seconds", LATENCY_BUCKETS_S)
                        for name in ("ttft_s", "tpot_s", "kv_transfer_s")}
        self.queue = Gauge("splitserve_queue_depth", "requests per stage", ("stage",))
        self.blocks = Gauge("splitserve_kv_blocks", "KV blocks per instance", ("instance", "state"))
        self.kv_bytes = Counter("splitserve_kv_bytes", "KV bytes per link, raw and on the wire", ("link", "kind"))
        self.codec = Gauge("splitserve_kv_codec", "codec level per link", ("link", "level"))


class ServerMetrics:
    def __init__(self, use_ray: bool) -> None:
        self._ray = _RayMetrics() if use_ray else None
        self._lock = threading.Lock()
        self.requests: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.tokens: dict[str, int] = defaultdict(int)
        self.latency: dict[str, deque[float]] = {k: deque(maxlen=KEEP_SAMPLES) for k in ("ttft_s", "tpot_s", "kv_transfer_s")}
        self.latency_count: dict[str, int] = defaultdict(int)
        self.queue: dict[str, int] = {}
        self.blocks: dict[str, dict[str, int]] = {}
        self.kv_bytes: dict[str, dict[str, int]] = defaultdict(lambda: {"raw": 0, "wire": 0})
        self.codec: dict[str, str] = {}

    def request(self, endpoint: str, status: str) -> None:
        with self._lock:
            self.requests[endpoint][status] += 1
        if self._ray:
            self._ray.requests.inc(1, {"endpoint": endpoint, "status": status})

    def finished(self, record: RequestRecord, link: str | None) -> None:
        """A request left the cluster (any status): its tokens, latencies and KV bytes."""
        samples = {"ttft_s": record.ttft_s, "tpot_s": record.tpot_s if record.output_tokens > 1 else None,
                   "kv_transfer_s": record.kv_transfer_s}
        with self._lock:
            self.tokens["prompt"] += record.prompt_tokens
            self.tokens["completion"] += record.output_tokens
            for name, value in samples.items():
                if value is not None:
                    self.latency[name].append(value)
                    self.latency_count[name] += 1
            if link and record.kv_bytes_raw:
                self.kv_bytes[link]["raw"] += record.kv_bytes_raw
                self.kv_bytes[link]["wire"] += record.kv_bytes_wire
        if self._ray:
            self._ray.tokens.inc(record.prompt_tokens, {"kind": "prompt"})
            if record.output_tokens:
                self._ray.tokens.inc(record.output_tokens, {"kind": "completion"})
            for name, value in samples.items():
                if value is not None:
                    self._ray.latency[name].observe(value)
            if link and record.kv_bytes_raw:
                self._ray.kv_bytes.inc(record.kv_bytes_raw, {"link": link, "kind": "raw"})
                if record.kv_bytes_wire:
                    self._ray.kv_bytes.inc(record.kv_bytes_wire, {"link": link, "kind": "wire"})

    def cluster_state(self, queue: dict[str, int], blocks: dict[str, tuple[int, int]], codec: dict[str, str]) -> None:
        """Gauges, refreshed by the poll thread: queue depth per stage, (free, total) blocks per
        instance, codec level per link."""
        with self._lock:
            self.queue = dict(queue)
            self.blocks = {n: {"free": f, "used": t - f, "total": t} for n, (f, t) in blocks.items()}
            self.codec = dict(codec)
        if self._ray:
            for stage, n in queue.items():
                self._ray.queue.set(n, {"stage": stage})
            for name, (free, total) in blocks.items():
                self._ray.blocks.set(free, {"instance": name, "state": "free"})
                self._ray.blocks.set(total - free, {"instance": name, "state": "used"})
            for link, level in codec.items():
                self._ray.codec.set(1, {"link": link, "level": level})

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            latency = {name: {"count": self.latency_count[name],
                              **{f"p{q}": percentile(list(vals), q) for q in (50, 90, 99)}}
                       for name, vals in self.latency.items()}
            return {"requests": {e: dict(s) for e, s in self.requests.items()},
                    "requests_by_status": _by_status(self.requests),
                    "tokens": dict(self.tokens), "latency": latency, "queue_depth": dict(self.queue),
                    "kv_blocks": {n: dict(b) for n, b in self.blocks.items()},
                    "kv_bytes": {link: dict(b) for link, b in self.kv_bytes.items()},
                    "kv_codec": dict(self.codec)}


def _by_status(requests: dict[str, dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for statuses in requests.values():
        for status, n in statuses.items():
            out[status] += n
    return dict(out)
