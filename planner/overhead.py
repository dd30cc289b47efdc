"""The serving runtime's own time per iteration, beyond LLMEngine.step: measured on the
running cluster.

A served step costs more than the engine step the profile times alone: the serving loop
(calls handed over from Ray's threads, event emission), the actor's replies to the front
end's polls, the KV channel's threads, and the driver and Ray's own processes on the same
cores. The profiler starts the deployment itself (one prefill and one decode instance of the
config, Ray, the front end) and sends requests one at a time, so no queueing and no other
instance's work is in the numbers:

    prefill overhead  median TTFT - modeled prefill step of that prompt
    decode overhead   median gap between consecutive decode steps - modeled decode step, at
                      batch 1 (one request at a time) and at larger batches (B requests sent
                      together, steps where all B decode), fitted as const + per_seq * batch
    admission         a batch of 8 decodes while short requests join one at a time: the steps
                      that admit one exceed the model by more than the plain steps; the
                      difference is charged to the decode step that admits each request
    KV transfer       the one-at-a-time requests' transfer time (first token to the decode side
                      holding the whole KV): the channel inside a running instance, which the
                      isolated probe can understate (~7 ms probed vs 61 ms served on H100)

They are added to every modeled step of that pool (as work: they share cores like the step).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import Any, Callable

from cluster.config import ClusterConfig
from engine.request import SamplingParams
from planner.latency import StepModel


def measure_overhead(config: ClusterConfig, model: StepModel, num_requests: int = 8, prompt_len: int = 128,
                     output_len: int = 16, batches: tuple[int, ...] = (8, 32),
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    from cluster.cluster import Cluster
    cfg = replace(config, mode="disagg", placement="pack", prefill=replace(config.prefill, instances=1),
                  decode=replace(config.decode, instances=1))
    cluster = Cluster.start(cfg)
    ttfts: list[float] = []
    transfers: list[tuple[int, float]] = []        # (raw KV bytes, served transfer s)
    points: list[tuple[int, float, float]] = []    # (batch, served gap s, modeled step s)
    try:
        # 1. one request at a time: TTFT, and decode steps at batch 1
        for i in range(num_requests + 1):   # the first warms the path up and is not counted
            rid, steps = _submit(cluster, i, 1, prompt_len, output_len)[0]
            if i == 0 or not cluster.frontend.requests[rid].done:
                continue
            record = cluster.frontend.record(rid)
            ttfts.append(record.ttft_s)
            if record.kv_transfer_s and record.kv_bytes_raw:
                transfers.append((record.kv_bytes_raw, record.kv_transfer_s))
            points.extend(_gaps(steps, 1, prompt_len, model))
            time.sleep(0.2)
        # 2. a decode batch of B at once (admitted together once their prefills are done)
        for b in batches:
            if b > cfg.decode.max_batch_size:
                continue
            # long enough that the first prefill batch is still decoding when the last joins
            ids = _submit(cluster, 1000 * b, b, prompt_len // 2, 3 * output_len)
            points.extend(_gaps(ids[0][1], b, prompt_len // 2, model))
        # 3. requests joining a running decode batch one at a time: what an admission costs
        admission, adm_steps = _admission_cost(cluster, model, prompt_len, log)
    finally:
        cluster.shutdown()
    ttft = statistics.median(ttfts)
    model_prefill = model.prefill_time(prompt_len, prompt_len * prompt_len)
    per_batch = {}
    for b in sorted({p[0] for p in points}):
        gaps = [(g, m) for bb, g, m in points if bb == b]
        per_batch[b] = (statistics.median(g for g, _ in gaps), statistics.median(m for _, m in gaps))
        log(f"  decode batch {b}: served step {per_batch[b][0] * 1e3:.0f} ms vs modeled {per_batch[b][1] * 1e3:.0f} ms")
    const, per_seq = _fit_overhead([(b, g - m) for b, (g, m) in per_batch.items()])
    out = {"prefill_s": max(0.0, ttft - model_prefill), "decode_s": const, "decode_per_seq_s": per_seq,
           "served_ttft_s": ttft, "model_prefill_s": model_prefill,
           "decode_admission_s": admission, "admission_steps": adm_steps,
           "decode_steps": {str(b): {"served_s": g, "model_s": m} for b, (g, m) in per_batch.items()},
           "num_requests": len(ttfts), "prompt_len": prompt_len, "output_len": output_len}
    if transfers:
        out["kv_transfer"] = {"raw_bytes": statistics.median(b for b, _ in transfers),
                              "served_s": statistics.median(t for _, t in transfers), "num": len(transfers)}
    log(f"  served TTFT {ttft * 1e3:.0f} ms vs modeled prefill {model_prefill * 1e3:.0f} ms; decode overhead "
        f"{const * 1e3:.1f} ms + {per_seq * 1e3:.2f} ms/seq; {admission * 1e3:.1f} ms per admission")
    return out


def _admission_cost(cluster: Any, model: StepModel, prompt_len: int, log: Callable[[str], None],
                    batch: int = 8, joiners: int = 8) -> tuple[float, dict[str, float]]:
    """A decode batch runs; short requests join it one at a time. A step that admits one (its
    kv_received falls inside the step) exceeds the model by more than the plain steps do: that
    difference is the loop's time per admission (landing staged KV in the cache, its events)."""
    vocab = min(1000, cluster.config.model.source.model_config().vocab_size - 1)
    steps: dict[float, int] = {}
    admits: list[float] = []

    def on_event(e: dict[str, Any]) -> None:
        if not str(e.get("instance", "")).startswith("decode"):
            return
        if e.get("kind") == "token":
            steps[e["t"]] = steps.get(e["t"], 0) + 1
        elif e.get("kind") == "kv_received":
            admits.append(e["t"])

    def prompt(k: int) -> list[int]:
        return [1 + (k * 13 + j * 7) % vocab for j in range(prompt_len)]
    running = [cluster.submit(prompt(5000 + i), SamplingParams(max_tokens=400, ignore_eos=True), on_event=on_event)
               for i in range(batch)]
    deadline = time.monotonic() + 30
    while sum(1 for n in steps.values() if n == batch) < 4 and time.monotonic() < deadline:
        cluster.frontend.poll(0.05)
    for k in range(joiners):
        rid = cluster.submit(prompt(6000 + k), SamplingParams(max_tokens=3, ignore_eos=True), on_event=on_event)
        cluster.wait([rid], timeout_s=20)
        pause = time.monotonic() + 0.1
        while time.monotonic() < pause:
            cluster.frontend.poll(0.05)
    for rid in running:
        cluster.frontend.abort(rid)
    admitting, plain = admission_gaps(steps, admits, batch, prompt_len, model)
    if not plain or not admitting:
        return 0.0, {}
    cost = max(0.0, statistics.median(admitting) - statistics.median(plain))
    log(f"  decode steps that admit a request: {len(admitting)}, {statistics.median(admitting) * 1e3:+.0f} ms over "
        f"the model; plain steps {statistics.median(plain) * 1e3:+.0f} ms")
    return cost, {"admitting_excess_s": statistics.median(admitting), "plain_excess_s": statistics.median(plain),
                  "num_admitting": len(admitting), "num_plain": len(plain)}


def admission_gaps(steps: dict[float, int], admits: list[float], batch: int, prompt_len: int,
                   model: StepModel) -> tuple[list[float], list[float]]:
    """Seconds over the model of the gaps between decode steps (step time -> tokens in it)
    that admit one request, and of plain full-batch gaps."""
    ts = sorted(steps)
    plain, admitting = [], []
    for a, b in zip(ts, ts[1:]):
        extra = (b - a) - model.decode_time(steps[b], steps[b] * prompt_len * 1.5)
        inside = sum(1 for t in admits if a < t <= b)
        # only while the batch still decodes on both sides: once it has finished (GPU steps are
        # short), the gap before a joiner's first step is idle time, not admission work
        if inside == 1 and steps[a] >= batch and steps[b] >= batch:
            admitting.append(extra)
        elif inside == 0 and steps[b] == batch and steps[a] == batch:
            plain.append(extra)
    return admitting, plain


def _submit(cluster: Any, base: int, n: int, prompt_len: int, output_len: int) -> list[tuple[str, dict[float, int]]]:
    """n requests at once; waits for them. Returns (id, decode step time -> tokens in it) per
    request (the step map is shared: every request's tokens of one step carry its time)."""
    steps: dict[float, int] = {}
    first: set[str] = set()
    vocab = min(1000, cluster.config.model.source.model_config().vocab_size - 1)

    def on_event(e: dict[str, Any]) -> None:
        if e.get("kind") != "token":
            return
        if e["id"] not in first:       # the first token comes from prefill
            first.add(e["id"])
            return
        steps[e["t"]] = steps.get(e["t"], 0) + 1
    ids = [cluster.submit([1 + ((base + i) * 31 + j * 7) % vocab for j in range(prompt_len)],
                          SamplingParams(max_tokens=output_len, ignore_eos=True), on_event=on_event) for i in range(n)]
    cluster.wait(ids, timeout_s=300)
    return [(rid, steps) for rid in ids]


def _gaps(steps: dict[float, int], batch: int, prompt_len: int, model: StepModel) -> list[tuple[int, float, float]]:
    """Gaps between consecutive decode steps that both ran the whole batch."""
    ts = sorted(steps)
    out = []
    for k, (a, b) in enumerate(zip(ts, ts[1:])):
        if steps[a] == batch and steps[b] == batch:
            ctx = prompt_len + k + 2
            out.append((batch, b - a, model.decode_time(batch, batch * ctx)))
    return out


def _fit_overhead(points: list[tuple[int, float]]) -> tuple[float, float]:
    """overhead = const + per_seq * batch through the measured points, both >= 0."""
    if not points:
        return 0.0, 0.0
    if len(points) == 1:
        return max(0.0, points[0][1]), 0.0
    (b0, o0), (b1, o1) = min(points), max(points)
    per_seq = max(0.0, (o1 - o0) / (b1 - b0))
    return max(0.0, o0 - per_seq * b0), per_seq
