"""Aggregated baselines in the plan search: the same GPUs as instances that run both phases
(`colocated`: continuous batching with whole prefills; `chunked`: chunked prefills riding on
decode steps). A disaggregated plan is chosen only where it beats them per GPU: with SLOs
that leave room for interference, or KV transfer that costs more than the interference it
removes, it does not (measured on 2x H200, docs/planner.md).

An aggregated plan keeps all its instances in the config's `decode` section (batch size and
KV memory of a decoding instance) with the prefill section's token budget and chunk size;
the router spreads requests evenly over independent instances, so one instance is simulated
at 1/n of the rate and its goodput scaled by n.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from cluster.config import ClusterConfig
from planner.perf import Perf
from planner.capacity import attainment_at, bisect_rate, prefill_bound
from planner.search import Budget, Plan, SearchOptions, sim_setup
from planner.workload import Workload


def aggregated_config(base: ClusterConfig, mode: str, tp: int, instances: int) -> ClusterConfig:
    return replace(base, mode=mode, placement="pack",
                   prefill=replace(base.prefill, instances=0, tp=tp),
                   decode=replace(base.decode, instances=instances, tp=tp,
                                  max_batch_tokens=base.prefill.max_batch_tokens,
                                  chunk_size=base.prefill.chunk_size),
                   kv_transfer=replace(base.kv_transfer, codec="raw"))


def aggregated_plans(base: ClusterConfig, perf: Perf, workload: Workload, budget: Budget, opt: SearchOptions,
                     tps: list[int], duration_s: float, log: Callable[[str], None] = lambda s: None) -> list[Plan]:
    """One simulated plan per aggregated mode in `opt.modes`, at the TP size with the most
    prefill throughput per GPU (on a 32-GPU llama-3-8b search the next size was 20-23% worse
    per GPU in both modes, and simulating it pushed the search past 60 s)."""
    out: list[Plan] = []
    modes = [m for m in opt.modes if m != "disagg"]
    if not modes:
        return out
    ranked = sorted(tps, key=lambda t: -prefill_bound(perf.step_model(t), workload, base.prefill.max_batch_tokens) / t)
    for mode in modes:
        for tp in ranked[:1]:
            n = budget.gpus // tp
            if n < 1 or tp > budget.gpus_per_node:
                continue
            cfg = aggregated_config(base, mode, tp, n)
            one = replace(cfg, decode=replace(cfg.decode, instances=1))
            setup = sim_setup(one, perf, budget)
            hi = 1.2 * prefill_bound(setup.steps["decode"], workload, cfg.decode.max_batch_tokens)
            curve: list[tuple[float, float]] = []
            per_instance = bisect_rate(
                lambda r: attainment_at(one, setup, workload, r, opt.num_e2e_requests, "both", duration_s,
                                        opt.max_e2e_requests), hi, base.slo.attainment, iters=6, curve=curve)
            plan = Plan(cfg, n * per_instance, "simulated", {
                "curve": [(r * n, a) for r, a in sorted(curve)], "simulated_slice": f"1 instance x {n}"})
            log(f"simulated {plan.describe()}: {plan.goodput:.3g} req/s ({plan.per_gpu:.3g}/GPU)")
            out.append(plan)
    return out
