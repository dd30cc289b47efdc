"""The plan search: parallelism, instances per pool, placement and codec level that maximize
per-GPU goodput at the attainment target.

    1. candidates    TP sizes per pool that split the heads and fit a node; codec levels
                     worth trying on each link (raw only when raw transfer is negligible)
    2. per phase     DistServe's trick: bisect one prefill instance's rate in simulation with an
                     ideal decode side (TTFT only), and one decode instance's (TPOT only, KV
                     transfer included) with an ideal prefill side; the analytic bound caps
                     each bisection
    3. combine       instance counts per pool within the GPU budget and each placement's node
                     fit, from the per-instance capacities (queueing across instances ignored)
    4. end to end    the best few re-simulated whole (all instances, router, real links),
                     goodput bisected on joint attainment; a lossy codec level wins only if it
                     beats the best higher-quality one by more than `quality_margin`
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from cluster.config import ClusterConfig
from engine.metrics import summarize
from kvtransfer.codec import QUALITY_ORDER
from planner.hardware import tp_sizes
from planner.latency import LinearFit, StepModel
from planner.perf import Perf
from planner.capacity import attainment_at, bisect_rate, decode_bound, prefill_bound
from planner.simulator import SimSetup, simulate
from planner.transfer import LinkModel
from planner.workload import Workload

IDEAL = StepModel(0, LinearFit((0.0, 0.0, 0.0), source="ideal"), LinearFit((0.0, 0.0, 0.0), source="ideal"))
IDEAL_BLOCKS = 1 << 16


@dataclass(frozen=True)
class Budget:
    gpus: int
    gpus_per_node: int = 8
    link_gbps: float | None = None     # between nodes; None: as fast as the KV channel


@dataclass
class Plan:
    config: ClusterConfig
    goodput: float                  # req/s at the attainment target, whole plan
    stage: str                      # analytic | simulated
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def num_gpus(self) -> int:
        c = self.config
        return c.prefill.instances * c.prefill.tp + c.decode.instances * c.decode.tp

    @property
    def per_gpu(self) -> float:
        return self.goodput / max(1, self.num_gpus)

    def describe(self) -> str:
        c = self.config
        if c.mode != "disagg":
            tp = c.decode.tp if c.decode.instances else c.prefill.tp
            return f"{c.mode} {c.prefill.instances + c.decode.instances}x tp{tp}"
        return (f"{c.prefill.instances}P(tp{c.prefill.tp}) + {c.decode.instances}D(tp{c.decode.tp}), "
                f"codec {c.kv_transfer.codec}, {c.placement}")


# ---- placement ---------------------------------------------------------------------------------

def assign_nodes(config: ClusterConfig, gpus_per_node: int) -> dict[str, int] | None:
    """Node of each instance, as the launcher's placement groups land (first fit): `pack` keeps
    prefill i and decode i in one group, `spread` gives each instance its own group and
    deals them across nodes. None if a group does not fit a node."""
    p = [(f"prefill-{i}", config.prefill.tp) for i in range(config.prefill.instances)]
    d = [(f"decode-{i}", config.decode.tp) for i in range(config.decode.instances)]
    if config.placement == "pack":
        groups = [p[i:i + 1] + d[i:i + 1] for i in range(max(len(p), len(d)))]
    else:
        groups = [[m] for m in itertools.chain.from_iterable(itertools.zip_longest(p, d)) if m]
    total = sum(t for _, t in p + d)
    num_nodes = -(-total // gpus_per_node)
    free = [gpus_per_node] * max(1, num_nodes)
    out: dict[str, int] = {}
    for gi, g in enumerate(groups):
        need = sum(t for _, t in g)
        order = range(len(free)) if config.placement == "pack" else [(gi + k) % len(free) for k in range(len(free))]
        node = next((n for n in order if free[n] >= need), None)
        if node is None:
            free.append(gpus_per_node)
            node = len(free) - 1
            if need > gpus_per_node:
                return None
        free[node] -= need
        for name, _ in g:
            out[name] = node
    return out


def sim_setup(config: ClusterConfig, perf: Perf, budget: Budget, ideal: str | None = None) -> SimSetup:
    """The simulator's view of `config`; `ideal` ("prefill" or "decode") makes that pool free."""
    nodes = assign_nodes(config, budget.gpus_per_node) or {}
    emulated = config.kv_transfer.link_gbps
    intra, inter = perf.link("intra", emulated), perf.link("inter", emulated, budget.link_gbps)

    def link(p: int, d: int):  # noqa: ANN202
        return intra if nodes.get(f"prefill-{p}") == nodes.get(f"decode-{d}") else inter
    steps = {"prefill": perf.step_model(config.prefill.tp), "decode": perf.step_model(config.decode.tp)}
    blocks = {"prefill": perf.kv_blocks(config, config.prefill), "decode": perf.kv_blocks(config, config.decode)}
    overhead = dict(perf.overhead_s)
    if ideal:
        steps[ideal], blocks[ideal] = IDEAL, IDEAL_BLOCKS
        overhead = {k: v for k, v in overhead.items() if not k.startswith(ideal)}
    # CPU: instances of one node share its cores; an ideal pool takes none
    sharing = perf.sharing if config.device == "cpu" else None
    node_of = {n: k for n, k in nodes.items() if not (ideal and n.startswith(ideal))}
    return SimSetup(perf.model, steps, blocks, None if ideal == "decode" else perf.transfer, link,
                    overhead, sharing, node_of)


# ---- the search --------------------------------------------------------------------------------

@dataclass
class SearchOptions:
    levels: tuple[str, ...] = QUALITY_ORDER
    placements: tuple[str, ...] = ("pack", "spread")
    num_phase_requests: int = 100
    max_phase_requests: int = 400
    num_e2e_requests: int = 200
    max_e2e_requests: int = 1200
    max_slice_instances: int = 6
    finalists: int = 2
    quality_margin: float = 0.05
    max_tp: int = 8
    tp_choices: tuple[int, ...] | None = None
    modes: tuple[str, ...] = ("disagg", "colocated", "chunked")   # aggregated ones as baselines to beat


def phase_target(target: float) -> float:
    """Each phase alone must do better than the joint target: misses of the two add up."""
    return 1 - (1 - target) / 2


def levels_worth_trying(perf: Perf, workload: Workload, link: LinkModel, tpot_s: float, raw_capacity: float,
                        levels: tuple[str, ...]) -> list[str]:
    """Every other level when raw transfer is not negligible: a long prompt's raw KV costs a
    noticeable share of its token-time budget, or the link would be busy a noticeable share
    of the time at the rate one decode instance sustains with raw KV."""
    if perf.transfer is None:
        return []
    p90 = sorted(workload.prompt_lens)[int(0.9 * (len(workload.prompt_lens) - 1))]
    raw_p90 = perf.transfer.total_time(p90, "raw", link)
    raw_mean = sum(perf.transfer.total_time(p, "raw", link) for p in workload.prompt_lens) / len(workload.prompt_lens)
    if raw_p90 < 0.05 * tpot_s * max(1.0, workload.mean_output - 1) and raw_mean * raw_capacity < 0.2:
        return []
    return [lv for lv in levels if lv != "raw"]


def search(base: ClusterConfig, perf: Perf, workload: Workload, budget: Budget,
           options: SearchOptions | None = None, log: Callable[[str], None] = lambda s: None) -> list[Plan]:
    """Plans ranked best first (simulated finalists, then analytic runners-up)."""
    opt = options or SearchOptions()
    t0 = time.monotonic()
    target = base.slo.attainment
    tps = [t for t in (opt.tp_choices or tp_sizes(perf.model, budget.gpus_per_node, opt.max_tp)) if t <= budget.gpus]
    if budget.gpus < 2:
        raise ValueError("--gpus: a disaggregated plan needs at least 2 GPUs (one per pool)")
    one = replace(base, mode="disagg", prefill=replace(base.prefill, instances=1),
                  decode=replace(base.decode, instances=1), placement="pack")

    # 1-2. per-instance capacity of each pool at each TP size (and codec level, for decode)
    pre_cap: dict[int, float] = {}
    for tp in tps:
        cfg = replace(one, prefill=replace(one.prefill, tp=tp))
        setup = sim_setup(cfg, perf, budget, ideal="decode")
        hi = 1.2 * prefill_bound(setup.steps["prefill"], workload, cfg.prefill.max_batch_tokens)
        pre_cap[tp] = bisect_rate(lambda r: attainment_at(
            cfg, setup, workload, r, opt.num_phase_requests, "ttft", 20 * base.slo.ttft_s, 3000, True),
            hi, phase_target(target))
        log(f"prefill tp{tp}: {pre_cap[tp]:.3g} req/s per instance ({perf.source(tp)})")
    multi_node = budget.gpus > budget.gpus_per_node
    if perf.transfer is not None and perf.transfer.encode_bytes_per_s:
        # a profile with codec speeds: a level it did not measure would look free; leave it out
        measured = set(perf.transfer.encode_bytes_per_s) | {"raw"}
        opt = replace(opt, levels=tuple(lv for lv in opt.levels if lv in measured))
    link_kinds = {"intra": perf.link("intra", base.kv_transfer.link_gbps)}
    inter = perf.link("inter", base.kv_transfer.link_gbps, budget.link_gbps)
    # across nodes only matters when it is slower than within one
    multi_node = multi_node and inter.bytes_per_s < link_kinds["intra"].bytes_per_s
    if multi_node:
        link_kinds["inter"] = inter
    dec_cap: dict[tuple[int, str, str], float] = {}
    # a decode overload shows once the batch has turned over: a couple of request lifetimes
    decode_duration = 2 * workload.mean_output * base.slo.tpot_s
    for tp in tps:
        for kind, link in link_kinds.items():
            levels = ["raw"] if "raw" in opt.levels else list(opt.levels)
            i = 0
            while i < len(levels):
                level = levels[i]
                i += 1
                cfg = replace(one, decode=replace(one.decode, tp=tp), kv_transfer=replace(one.kv_transfer, codec=level))
                setup = sim_setup(cfg, perf, budget, ideal="prefill")
                setup.link = lambda p, d, link=link: link
                hi = 1.2 * decode_bound(setup.steps["decode"], workload, base.slo.tpot_s, cfg.decode.max_batch_size,
                                        setup.blocks["decode"], cfg.engine.block_size)
                cap = 0.0 if hi <= 0 else bisect_rate(
                    lambda r: attainment_at(cfg, setup, workload, r, opt.num_phase_requests, "tpot",
                                            decode_duration, opt.max_phase_requests), hi, phase_target(target), iters=4)
                dec_cap[(tp, kind, level)] = cap
                log(f"decode tp{tp} {kind} {level}: {cap:.3g} req/s per instance")
                if level == "raw":
                    levels += levels_worth_trying(perf, workload, link, base.slo.tpot_s, cap, opt.levels)

    # 3. instance counts, placement, level: analytic goodput from per-instance capacities
    analytic: list[Plan] = []
    placements = opt.placements if multi_node else ("pack",)
    for tp_p, tp_d, placement in itertools.product(tps, tps, placements):
        kind = "intra" if not multi_node or placement == "pack" else "inter"
        for level in {lv for (t, k, lv) in dec_cap if t == tp_d and k == kind}:
            rp, rd = pre_cap[tp_p], dec_cap[(tp_d, kind, level)]
            if rp <= 0 or rd <= 0:
                continue
            best: tuple[float, float, int, int] | None = None
            for n_p in range(1, budget.gpus // tp_p + 1):
                n_d_max = (budget.gpus - n_p * tp_p) // tp_d
                # the decode count that balances this prefill count, and its neighbours
                for n_d in {max(1, min(n_d_max, round(n_p * rp / rd) + k)) for k in (-1, 0, 1)}:
                    if n_d < 1 or n_p * tp_p + n_d * tp_d > budget.gpus:
                        continue
                    good = min(n_p * rp, n_d * rd)
                    key = (good / (n_p * tp_p + n_d * tp_d), good, n_p, n_d)
                    if best is None or key[0] > best[0] * 1.02 or (key[0] >= best[0] * 0.98 and good > best[1]):
                        best = key
            if best is None:
                continue
            _, good, n_p, n_d = best
            cfg = replace(base, mode="disagg", placement=placement,
                          prefill=replace(base.prefill, tp=tp_p, instances=n_p),
                          decode=replace(base.decode, tp=tp_d, instances=n_d),
                          kv_transfer=replace(base.kv_transfer, codec=level))
            if assign_nodes(cfg, budget.gpus_per_node) is None:
                continue
            analytic.append(Plan(cfg, good, "analytic", {"prefill_per_instance": rp, "decode_per_instance": rd}))
    analytic.sort(key=lambda p: (-p.per_gpu, QUALITY_ORDER.index(p.config.kv_transfer.codec)
                                 if p.config.kv_transfer.codec in QUALITY_ORDER else 9))
    if not analytic:
        raise ValueError("no plan meets the SLOs at any rate on this budget; loosen slo or add GPUs")

    # 4. the best few, simulated whole; quality tie-break among codec levels
    finalists = _pick_finalists(analytic, opt.finalists)
    simulated = []
    duration = max(20 * base.slo.ttft_s, decode_duration)
    for plan in finalists:
        cfg = plan.config
        part, scale = plan_slice(cfg, opt.max_slice_instances)
        setup = sim_setup(part, perf, budget)
        curve: list[tuple[float, float]] = []
        good = scale * bisect_rate(
            lambda r: attainment_at(part, setup, workload, r, opt.num_e2e_requests, "both", duration,
                                    opt.max_e2e_requests), plan.goodput / scale * 1.15, target, iters=6, curve=curve)
        simulated.append(Plan(cfg, good, "simulated", {
            **plan.detail, "analytic_goodput": plan.goodput, "curve": [(r * scale, a) for r, a in sorted(curve)],
            "simulated_slice": f"{part.prefill.instances}P+{part.decode.instances}D x {scale:g}"}))
        log(f"simulated {simulated[-1].describe()}: {good:.3g} req/s ({simulated[-1].per_gpu:.3g}/GPU)")
    from planner.aggregated import aggregated_plans
    simulated += aggregated_plans(base, perf, workload, budget, opt, tps, duration, log)
    simulated.sort(key=lambda p: -p.per_gpu)
    top = simulated[0].per_gpu
    ok = [p for p in simulated if p.per_gpu >= top * (1 - opt.quality_margin)]
    best = min(ok, key=lambda p: (_quality(p), -p.per_gpu))
    ranked = [best] + [p for p in simulated if p is not best]
    rest = [p for p in analytic if all(p.config != q.config for q in ranked)]
    for p in ranked:
        p.detail["search_s"] = time.monotonic() - t0
    return ranked + rest


def plan_slice(config: ClusterConfig, max_instances: int) -> tuple[ClusterConfig, float]:
    """The part of a plan simulated end to end, and the factor that scales its goodput to the
    whole: the plan itself when small, else its smallest repeating unit, else one instance of
    the smaller pool with its share of the other (the router balances instances evenly)."""
    n_p, n_d = config.prefill.instances, config.decode.instances
    if n_p + n_d <= max_instances:
        return config, 1.0
    g = math.gcd(n_p, n_d)
    k_p, k_d = n_p // g, n_d // g
    if k_p + k_d > max_instances:
        k_p, k_d = (1, max(1, round(n_d / n_p))) if n_p <= n_d else (max(1, round(n_p / n_d)), 1)
    part = replace(config, prefill=replace(config.prefill, instances=k_p), decode=replace(config.decode, instances=k_d))
    return part, min(n_p / k_p, n_d / k_d)


def _quality(plan: Plan) -> int:
    lv = plan.config.kv_transfer.codec
    return QUALITY_ORDER.index(lv) if lv in QUALITY_ORDER else len(QUALITY_ORDER)


def _pick_finalists(analytic: list[Plan], k: int) -> list[Plan]:
    """The top k by analytic per-GPU goodput, plus the best plan at each better codec level
    within 10% of the top (so the quality tie-break has something to choose from), plus the
    best plan at the best level present."""
    out = list(analytic[:k])
    top = analytic[0].per_gpu
    for p in analytic:
        if p.per_gpu >= 0.9 * top and _quality(p) < min(_quality(q) for q in out) and p not in out:
            out.append(p)
    # and the best plan at the best quality level: the per-phase estimates leave out costs only
    # the whole plan shows (a CPU codec's work on the prefill side's cores)
    best_q = min(analytic, key=lambda p: (_quality(p), -p.per_gpu))
    if best_q not in out:
        out.append(best_q)
    return out


def predicted_curve(config: ClusterConfig, perf: Perf, budget: Budget, workload: Workload, rates: list[float],
                    n: int = 300) -> list[dict[str, Any]]:
    """Simulated summary at each rate (the plan's predicted attainment-vs-rate curve)."""
    setup = sim_setup(config, perf, budget)
    out = []
    for r in rates:
        prompts, outputs, arrivals = workload.trace(n, r)
        s = summarize(simulate(config, setup, prompts, outputs, arrivals), config.slo.ttft_s, config.slo.tpot_s, r)
        out.append({k: s[k] for k in ("rate", "attainment", "attainment_ttft", "attainment_tpot", "ttft_p90", "tpot_p90")})
    return out
