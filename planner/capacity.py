"""How much load one configuration carries, in simulation: a trace long enough to show
overload, attainment at a rate, the highest rate that meets a target (bisection), and the
analytic upper bounds that start each bisection."""

from __future__ import annotations

from typing import Callable

from cluster.config import ClusterConfig
from engine.metrics import attainment
from planner.latency import StepModel
from planner.simulator import SimSetup, simulate
from planner.workload import Workload


# ---- goodput by bisection ----------------------------------------------------------------------

def trace_size(rate: float, duration_s: float, lo: int, hi: int) -> int:
    """Requests for a simulated run: enough to last `duration_s` (so an overload shows as
    queueing rather than hiding in a short burst), within [lo, hi]."""
    return int(min(hi, max(lo, rate * duration_s)))


def attainment_at(config: ClusterConfig, setup: SimSetup, workload: Workload, rate: float, n: int,
                  metric: str = "both", duration_s: float = 0.0, max_n: int = 1500,
                  single_token: bool = False) -> float:
    prompts, outputs, arrivals = workload.trace(trace_size(rate, duration_s, n, max_n), rate)
    if single_token:  # prefill alone: the first token is all that is measured
        outputs = [1] * len(outputs)
    records = simulate(config, setup, prompts, outputs, arrivals)
    both, ttft, tpot = attainment(records, config.slo.ttft_s, config.slo.tpot_s)
    return {"both": both, "ttft": ttft, "tpot": tpot}[metric]


def bisect_rate(attain: Callable[[float], float], hi: float, target: float, iters: int = 7,
                curve: list[tuple[float, float]] | None = None) -> float:
    """Highest rate with attainment >= target, searched in (0, hi] (hi doubles while it passes)."""
    lo = 0.0
    for _ in range(3):
        a = attain(hi)
        if curve is not None:
            curve.append((hi, a))
        if a < target:
            break
        lo, hi = hi, hi * 2
    else:
        return lo
    for _ in range(iters):
        if hi - lo <= 0.02 * hi:
            break
        mid = (lo + hi) / 2
        a = attain(mid)
        if curve is not None:
            curve.append((mid, a))
        lo, hi = (mid, hi) if a >= target else (lo, mid)
    return lo


# ---- analytic bounds ---------------------------------------------------------------------------

def prefill_bound(step: StepModel, workload: Workload, max_batch_tokens: int) -> float:
    """Requests/s one prefill instance sustains at full token batches (an upper bound)."""
    mean_len = workload.mean_prompt
    per_batch = max(1.0, max_batch_tokens / mean_len)
    n = per_batch * mean_len
    attn = per_batch * sum(p * p for p in workload.prompt_lens) / len(workload.prompt_lens)
    return per_batch / max(step.prefill_time(n, attn), 1e-9)


def decode_bound(step: StepModel, workload: Workload, tpot_s: float, max_batch: int, num_blocks: int,
                 block_size: int) -> float:
    """Requests/s one decode instance sustains with the largest batch whose step fits the TPOT
    target and the KV cache (an upper bound)."""
    ctx = workload.mean_prompt + workload.mean_output / 2
    by_memory = int(num_blocks * block_size / (workload.mean_prompt + workload.mean_output))
    best = 0.0
    for b in range(1, max(1, min(max_batch, by_memory)) + 1):
        t = step.decode_time(b, b * ctx)
        if t <= tpot_s:
            best = max(best, b / t / max(1.0, workload.mean_output - 1))
    return best
