"""A worker's step loop on its own thread.

Only the loop thread touches the scheduler, the block manager and the model; other threads
(Ray actor calls, KV channel threads) hand it work with `call` and read what happened with
`wait_events`. That single-owner rule is what keeps KV blocks from being freed or reused
behind a transfer's back.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable


class ServingLoop:
    def __init__(self, step: Callable[[], bool], name: str = "worker") -> None:
        self._step = step               # returns True if it did work
        self.name = name
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._events: list[dict[str, Any]] = []
        self._cv = threading.Condition()
        self._stopped = False
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"{name}-loop", daemon=True)
        # where the loop's time goes (read by `times`): steps that did work, their wall and
        # thread-CPU seconds (wall well above CPU means the thread waited for a core or the GIL)
        self._times = {"steps": 0, "step_s": 0.0, "step_cpu_s": 0.0, "calls_s": 0.0}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the loop thread before its next step; the future holds its result."""
        fut: Future = Future()
        with self._cv:
            if self.error is not None:
                fut.set_exception(RuntimeError(f"{self.name} loop died: {self.error}"))
                return fut
            self._calls.append((fn, fut))
            self._cv.notify_all()
        return fut

    def times(self) -> dict[str, float]:
        """Cumulative loop accounting plus the process's CPU seconds (all its threads)."""
        return {**self._times, "process_cpu_s": time.process_time()}

    def emit(self, event: dict[str, Any]) -> None:
        with self._cv:
            self._events.append(event)
            self._cv.notify_all()

    def wait_events(self, timeout: float) -> list[dict[str, Any]]:
        """Events since the last call; waits up to `timeout` s for the first one."""
        with self._cv:
            if not self._events and self.error is None:
                self._cv.wait(timeout)
            events, self._events = self._events, []
        if self.error is not None and not events:
            raise RuntimeError(f"{self.name} loop died: {self.error}")
        return events

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    if self._stopped:
                        return
                    calls, self._calls = list(self._calls), deque()
                t0 = time.perf_counter()
                for fn, fut in calls:
                    try:
                        fut.set_result(fn())
                    except BaseException as exc:  # the caller gets it; the loop goes on
                        fut.set_exception(exc)
                t1, c1 = time.perf_counter(), time.thread_time()
                worked = self._step()
                t2 = time.perf_counter()
                times = self._times
                times["calls_s"] += t1 - t0
                if worked:
                    times["steps"] += 1
                    times["step_s"] += t2 - t1
                    times["step_cpu_s"] += time.thread_time() - c1
                else:
                    with self._cv:
                        if not self._calls and not self._stopped:
                            self._cv.wait(0.005)
        except BaseException:
            self.error = traceback.format_exc(limit=8)
            with self._cv:
                for _, fut in self._calls:
                    fut.set_exception(RuntimeError(f"{self.name} loop died"))
                self._calls.clear()
                self._cv.notify_all()
