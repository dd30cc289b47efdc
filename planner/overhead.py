"""The serving runtime's own time per iteration, beyond LLMEngine.step: measured on the
running cluster.

A served step costs more than the engine step the profile times alone: the serving loop
(calls handed over from Ray's threads, event emission), the actor's replies to the front
end's polls, the KV channel's threads, and the driver and Ray's own processes on the same
cores. The profiler starts the deployment itself (one prefill and one decode instance of the
config, Ray, the front end) and sends requests one at a time, so no queueing and no other
instance's work is in the numbers:

    prefill overhead  median TTFT - modeled prefill step of that prompt
    decode overhead   median gap between consecutive decode tokens - modeled decode step at
                      batch 1 and that context

Both are added to every modeled step of that pool (as work: they share cores like the step).
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
                     output_len: int = 16, log: Callable[[str], None] = print) -> dict[str, Any]:
    from cluster.cluster import Cluster
    cfg = replace(config, mode="disagg", placement="pack", prefill=replace(config.prefill, instances=1),
                  decode=replace(config.decode, instances=1))
    cluster = Cluster.start(cfg)
    ttfts: list[float] = []
    gaps: list[float] = []
    try:
        for i in range(num_requests + 1):   # the first warms the path up and is not counted
            prompt = [1 + (i * 31 + j * 7) % 1000 for j in range(prompt_len)]
            tokens: list[float] = []
            rid = cluster.submit(prompt, SamplingParams(max_tokens=output_len, ignore_eos=True),
                                 on_event=lambda e: tokens.append(e["t"]) if e.get("kind") == "token" else None)
            cluster.wait([rid], timeout_s=120)
            rec = cluster.frontend.requests[rid]
            if i == 0 or not rec.done or len(tokens) < 3:
                continue
            ttfts.append(cluster.frontend.record(rid).ttft_s)
            gaps.extend(b - a for a, b in zip(tokens[1:], tokens[2:]))   # decode-to-decode only
            time.sleep(0.2)
    finally:
        cluster.shutdown()
    ttft = statistics.median(ttfts)
    gap = statistics.median(gaps)
    model_prefill = model.prefill_time(prompt_len, prompt_len * prompt_len)
    ctx = prompt_len + output_len / 2
    model_decode = model.decode_time(1, ctx)
    out = {"prefill_s": max(0.0, ttft - model_prefill), "decode_s": max(0.0, gap - model_decode),
           "served_ttft_s": ttft, "model_prefill_s": model_prefill,
           "served_decode_gap_s": gap, "model_decode_s": model_decode,
           "num_requests": len(ttfts), "prompt_len": prompt_len, "output_len": output_len}
    log(f"  served TTFT {ttft * 1e3:.0f} ms vs modeled prefill {model_prefill * 1e3:.0f} ms; "
        f"served decode gap {gap * 1e3:.0f} ms vs modeled step {model_decode * 1e3:.0f} ms")
    return out

