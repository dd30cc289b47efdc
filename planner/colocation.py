"""Instances that share a node's cores: how much slower each step runs, measured and simulated.

On a CPU node the cluster runs every instance as its own process with
`cpu_threads_per_instance` threads. While more threads are busy than there are cores (and
while instances contend for memory bandwidth) each step takes longer than it did alone,
which a profile of one instance cannot show.

    measured   the profiler starts K engine processes (as the cluster does: one process per
               instance, the deployment's threads each) and lets k = 1..K of them step at once
               over the same window; stretch(kind, k) = median step time with k busy / alone,
               for prefill and for decode steps, and (`kind_mixed`) for one instance's steps
               while the k - 1 others run the other kind (a prefill's matmuls beside a
               decode's weight streaming contend differently than two of a kind)
    simulated  SharedCores: a step's work is its modeled time alone (plus the serving loop's
               overhead); while k instances of one node are busy, each progresses at
               1 / stretch(kind, k) (processor sharing; the mixed table when another busy
               instance runs the other kind), re-timed whenever one starts or ends.
               Beyond the measured K, stretch grows in proportion to k. The CPU codec's
               encode (prefill side) and decode (decode side) of each transfer are jobs on the
               same cores (kind "codec", stretched like decode steps).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

KINDS = ("prefill", "decode")


@dataclass(frozen=True)
class CoreSharing:
    """stretch[kind][k - 1]: step time with k instances of a node busy / step time alone."""

    stretch: dict[str, tuple[float, ...]]
    cores: int = 0
    threads_per_instance: int = 1

    def factor(self, kind: str, num_busy: int, mixed: bool = False) -> float:
        """`mixed`: the others busy run the other kind of step (a prefill beside a decode)."""
        table = ((mixed and self.stretch.get(f"{kind}_mixed")) or self.stretch.get(kind)
                 or self.stretch.get("decode") or (1.0,))
        if num_busy <= len(table):
            return max(1.0, table[max(0, num_busy - 1)])
        return max(1.0, table[-1] * num_busy / len(table))

    def to_json(self) -> dict[str, Any]:
        return {"stretch": {k: list(v) for k, v in self.stretch.items()}, "cores": self.cores,
                "threads_per_instance": self.threads_per_instance}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CoreSharing":
        return cls({k: tuple(float(x) for x in v) for k, v in d["stretch"].items()}, int(d.get("cores", 0)),
                   int(d.get("threads_per_instance", 1)))


# ---- simulated: processor sharing per node -------------------------------------------------------

@dataclass
class _Run:
    name: str
    kind: str
    remaining: float            # seconds of work alone
    done: Callable[[], None]
    rate: float = 1.0           # work seconds per wall second
    since: float = 0.0
    version: int = 0
    process: str = ""           # the instance process it runs in (one interpreter)


class SharedCores:
    """Steps of the instances on one node share its cores (the simulator's view). Work run in
    an instance's process beside its steps (a CPU codec on its channel thread) shares that
    process's interpreter with them: the node's stretch counts busy processes, and the jobs
    of one process split its share (measured: a decode process decoding `default` KV spent
    half its step loop's wall time waiting, 173 s of CPU in 174 s).

    `clock` is the simulator's: `.now` and `.at(t, fn)`. Instances not in `node_of` run alone.
    """

    def __init__(self, clock: Any, sharing: CoreSharing, node_of: dict[str, int]) -> None:
        self.clock, self.sharing, self.node_of = clock, sharing, node_of
        self.runs: dict[int, dict[str, _Run]] = {}

    def shares(self, name: str) -> bool:
        return name in self.node_of

    def run(self, name: str, kind: str, work_s: float, done: Callable[[], None], on: str | None = None) -> float:
        """Start `work_s` seconds of work (alone) on the node of instance `on` (default: `name`);
        `done` fires when it ends. Returns the expected wall time at the current sharing."""
        node = self.node_of.get(on or name)
        if node is None:
            self.clock.at(self.clock.now + work_s, done)
            return work_s
        runs = self.runs.setdefault(node, {})
        runs[name] = _Run(name, kind, work_s, done, since=self.clock.now, process=on or name)
        self._retime(node)
        return work_s / runs[name].rate

    def busy(self, node: int) -> int:
        return len(self.runs.get(node, {}))

    def _retime(self, node: int) -> None:
        now = self.clock.now
        runs = self.runs[node]
        kinds = [r.kind for r in runs.values()]
        per_process: dict[str, int] = {}
        for r in runs.values():
            per_process[r.process] = per_process.get(r.process, 0) + 1
        for r in runs.values():
            r.remaining = max(0.0, r.remaining - (now - r.since) * r.rate)
            r.since = now
            mixed = r.kind in KINDS and any(k != r.kind and k in KINDS for k in kinds)
            r.rate = 1.0 / self.sharing.factor(r.kind, len(per_process), mixed) / per_process[r.process]
            r.version += 1
            self.clock.at(now + r.remaining / r.rate, lambda r=r, v=r.version: self._end(node, r, v))

    def _end(self, node: int, run: _Run, version: int) -> None:
        if run.version != version or self.runs[node].get(run.name) is not run:
            return   # re-timed since: a later event ends it
        del self.runs[node][run.name]
        self._retime(node)
        run.done()


# ---- measured: k engine processes stepping at once ------------------------------------------------

def _child(conn: Any, config: Any, threads: int, decode_shape: tuple[int, int], prefill_len: int) -> None:
    """One instance's stand-in: an engine in its own process, stepping on command."""
    import torch
    torch.set_num_threads(threads)
    from engine.request import SamplingParams
    from planner.profile import EngineProfiler
    prof = EngineProfiler(config, quick=True, log=lambda s: None)
    eng = prof.engine
    batch, ctx = decode_shape
    ctx = min(ctx, prof.max_len // 4)

    def fresh_batch() -> list[Any]:
        """A decode batch at context `ctx` (untimed); renewed before it reaches the model's length."""
        for r in list(eng.scheduler.running) + list(eng.scheduler.waiting):
            eng.abort(r.request_id)
        reqs = [eng.add_request([1 + (i * 7 + j) % prof.vocab for j in range(ctx)],
                                SamplingParams(max_tokens=prof.max_len - ctx - 4, ignore_eos=True))
                for i in range(batch)]
        while any(r.in_prefill for r in reqs):
            eng.step()
        eng.step()
        return reqs
    decoding = fresh_batch()
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd is None:
            return
        kind, start, duration = cmd
        times: list[float] = []
        while time.time() < start:
            time.sleep(0.001)
        while time.time() < start + duration:
            if decoding[0].num_tokens >= 2 * ctx:
                decoding = fresh_batch()
            t = time.perf_counter()
            if kind == "decode":
                eng.step()
            else:
                # a prompt alone while the decode batch waits: abort it after its step
                reqs = [eng.add_request([1 + j % prof.vocab for j in range(prefill_len)],
                                        SamplingParams(max_tokens=2, ignore_eos=True))]
                for r in decoding:
                    eng.scheduler.running.remove(r)
                eng.step()
                eng.abort(reqs[0].request_id)
                eng.scheduler.running.extend(decoding)
            times.append(time.perf_counter() - t)
        conn.send(times)


def _window(pipes: list[Any], kinds: list[str], duration_s: float, only_first: bool = False) -> float:
    """Each process steps its kind over the same window; median step time (of the first only)."""
    start = time.time() + 0.3
    for pipe, kind in zip(pipes, kinds):
        pipe.send((kind, start, duration_s))
    steps: list[float] = []
    for i, pipe in enumerate(pipes):
        times = pipe.recv()
        if i == 0 or not only_first:
            steps.extend(times[1:-1] or times)   # the last one may outlast the others
    return statistics.median(steps)


def measure_sharing(config: Any, max_instances: int, threads: int, duration_s: float = 5.0,
                    decode_shape: tuple[int, int] = (16, 256), prefill_len: int = 256,
                    log: Callable[[str], None] = print) -> CoreSharing:
    """stretch(kind, k) for k = 1..max_instances engine processes on this node."""
    import multiprocessing as mp
    import os
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for _ in range(max_instances):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_child, args=(child, config, threads, decode_shape, prefill_len), daemon=True)
        p.start()
        pipes.append(parent)
        procs.append(p)
    try:
        for pipe in pipes:
            if not pipe.poll(600) or pipe.recv() != "ready":
                raise RuntimeError("a co-location profile process did not start")
        stretch: dict[str, list[float]] = {}
        alone: dict[str, float] = {}
        for kind in KINDS:
            for k in range(1, max_instances + 1):
                t = _window(pipes[:k], [kind] * k, duration_s)
                alone.setdefault(kind, t)
                stretch.setdefault(kind, []).append(t / alone[kind])
                log(f"  {kind} steps with {k} instance(s) busy: {t * 1e3:.1f} ms (x{t / alone[kind]:.2f})")
        # one instance's steps while the others run the other kind (prefill beside decode)
        for kind, other in (KINDS, KINDS[::-1]):
            stretch[f"{kind}_mixed"] = [1.0]
            for k in range(2, max_instances + 1):
                t = _window(pipes[:k], [kind] + [other] * (k - 1), duration_s, only_first=True)
                stretch[f"{kind}_mixed"].append(t / alone[kind])
                log(f"  {kind} steps beside {k - 1} busy with {other}: {t * 1e3:.1f} ms (x{t / alone[kind]:.2f})")
        return CoreSharing({k: tuple(v) for k, v in stretch.items()}, os.cpu_count() or 1, threads)
    finally:
        for pipe in pipes:
            try:
                pipe.send(None)
            except (BrokenPipeError, OSError):
                pass
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
