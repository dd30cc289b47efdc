"""Link emulation and measurement: a byte-rate cap (to study 10/25/100 Gb/s networks on one
host) and an exponentially weighted bandwidth estimate the codec controller reads."""

from __future__ import annotations

import threading
import time


class RateLimiter:
    """Blocks senders so that bytes leave at no more than `gbps` gigabits per second."""

    def __init__(self, gbps: float | None) -> None:
        self.bytes_per_s = None if gbps is None else gbps * 1e9 / 8
        self._next_free = 0.0
        self._lock = threading.Lock()

    def acquire(self, num_bytes: int) -> None:
        if self.bytes_per_s is None:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_free)
            self._next_free = start + num_bytes / self.bytes_per_s
            wait = self._next_free - now
        if wait > 0:
            time.sleep(wait)


class BandwidthEstimator:
    """EWMA of observed bytes/s over transfers of at least `min_bytes`."""

    def __init__(self, initial_bytes_per_s: float, alpha: float = 0.3, min_bytes: int = 64 << 10) -> None:
        self.bytes_per_s = initial_bytes_per_s
        self.alpha = alpha
        self.min_bytes = min_bytes

    def observe(self, num_bytes: int, seconds: float) -> None:
        if num_bytes >= self.min_bytes and seconds > 0:
            self.bytes_per_s = (1 - self.alpha) * self.bytes_per_s + self.alpha * num_bytes / seconds
