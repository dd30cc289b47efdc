"""`splitserve sweep CONFIG --rates ... | --slo-scales ... --out DIR`: run the real cluster at
each point and the simulator on the same trace; write sweep.csv and plots.

    for each mode (--modes): start the cluster once (Ray, or --in-process), then per rate:
      a fresh front end and router (Cluster's own constructor), the same trace `splitserve run`
      drives (load_workload + gamma_arrivals, one seed), drive(), records -> summarize;
      the simulator on that trace -> summarize. --slo-scales re-scores each point's records
      at scaled TTFT/TPOT targets (one run serves every scale).
    --sim-only skips the real cluster (prediction curves only).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.workloads import gamma_arrivals, load_workload
from cluster.config import ClusterConfig, load_cluster_config
from cluster.report import write_run
from engine.errors import SplitserveError
from engine.metrics import RequestRecord, summarize
from engine.request import SamplingParams
from planner.perf import build_perf
from planner.search import Budget, sim_setup
from planner.simulator import simulate

FIELDS = ("mode", "rate", "per_gpu_rate", "slo_scale", "source", "num_requests", "num_finished", "attainment",
          "attainment_ttft", "attainment_tpot", "ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90", "duration_s")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="cluster YAML (e.g. a plan from `splitserve plan`)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--rates", help="comma-separated request rates (req/s)")
    g.add_argument("--slo-scales", help="comma-separated SLO multipliers, at --rate")
    p.add_argument("--rate", type=float, default=1.0, help="rate for --slo-scales")
    p.add_argument("--modes", default=None, help="comma-separated: disagg,colocated,chunked (default: the config's)")
    p.add_argument("--profile", default=None, help="profile.json for the simulator (else roofline)")
    p.add_argument("--workload", default="sharegpt")
    p.add_argument("--num-requests", type=int, default=40)
    p.add_argument("--duration", type=float, default=0.0,
                   help="seconds of arrivals per point at least (rate x duration requests, when more than "
                        "--num-requests): a sustained load, as the planner's capacity search simulates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--max-output-tokens", type=int, default=128)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--timeout", type=float, default=600.0, help="per point")
    p.add_argument("--warmup", type=int, default=24, help="trace requests run unmeasured before the first point")
    p.add_argument("--in-process", action="store_true", help="instances in this process, without Ray")
    p.add_argument("--sim-only", action="store_true", help="only the simulator")
    p.add_argument("--out", default="runs/sweep")


class Progress:
    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.monotonic()

    def step(self, label: str) -> None:
        self.done += 1
        width = 30
        fill = int(width * self.done / self.total)
        print(f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {label:<40} "
              f"{time.monotonic() - self.t0:5.0f} s", end="" if self.done < self.total else "\n",
              file=sys.stderr, flush=True)


def points_requests(rate: float, num_requests: int, duration_s: float) -> int:
    """Requests at one point: --num-requests, or enough for --duration seconds of arrivals."""
    return max(num_requests, math.ceil(rate * duration_s))


def num_gpus(config: ClusterConfig) -> int:
    """GPUs (or CPU instances) in both pools: the per-GPU denominator."""
    return config.prefill.instances * config.prefill.tp + config.decode.instances * config.decode.tp


def _row(mode: str, rate: float, gpus: int, scale: float, source: str, s: dict[str, Any]) -> dict[str, Any]:
    return {"mode": mode, "rate": rate, "per_gpu_rate": rate / gpus, "slo_scale": scale, "source": source,
            **{k: s.get(k) for k in FIELDS[5:]}}


def run(args: argparse.Namespace) -> int:
    try:
        base = load_cluster_config(args.config)
        source = base.model.source
        tokenizer = source.tokenizer()
        model = source.model_config()
        counts = {r: points_requests(r, args.num_requests, args.duration)
                  for r in ([float(r) for r in args.rates.split(",")] if args.rates else [args.rate])}
        items = load_workload(args.workload, max(counts.values()), tokenizer, args.seed, args.max_prompt_tokens,
                              args.max_output_tokens, model.vocab_size)
        profile = json.loads(Path(args.profile).read_text()) if args.profile else None
        perf = build_perf(base, model, profile)
    except (SplitserveError, ValueError, OSError) as exc:
        print(f"splitserve sweep: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    modes = args.modes.split(",") if args.modes else [base.mode]
    rates = [float(r) for r in args.rates.split(",")] if args.rates else [args.rate]
    scales = [float(s) for s in args.slo_scales.split(",")] if args.slo_scales else [1.0]
    prompts = [it.prompt_token_ids or tokenizer.encode(it.prompt) for it in items]
    lens = [len(p) for p in prompts]
    outs = [it.max_tokens for it in items]
    rows: list[dict[str, Any]] = []
    bar = Progress(len(modes) * len(rates) * (1 if args.sim_only else 2))
    for mode in modes:
        config = base.with_mode(mode)
        gpus = num_gpus(config)
        cluster = None
        if not args.sim_only:
            from cluster.cluster import Cluster
            cluster = Cluster.in_process(config) if args.in_process else Cluster.start(config)
            # warm-up, not measured: kernel compilation for the trace's shapes, graph capture,
            # channel connects (8 short requests left the first GPU point 20 points low)
            n = min(args.warmup, len(prompts))
            if n:
                _measure(cluster, prompts[:n], [min(o, 16) for o in outs[:n]],
                         gamma_arrivals(n, rates[0], args.seed + 1), args.timeout)
        try:
            for rate in rates:
                n = counts[rate]
                arrivals = gamma_arrivals(n, rate, args.seed)
                point = out / f"{mode}_rate{rate:g}"
                sim_records = simulate(config, sim_setup(config, perf, Budget(max(gpus, 1), args.gpus_per_node)),
                                       lens[:n], outs[:n], arrivals)
                bar.step(f"{mode} @ {rate:g} req/s simulated")
                real_records: list[RequestRecord] | None = None
                duration = None
                if cluster is not None:
                    before = _loop_snapshot(cluster)
                    real_records, duration = _measure(cluster, prompts[:n], outs[:n], arrivals, args.timeout)
                    write_run(point, real_records, summarize(real_records, config.slo.ttft_s, config.slo.tpot_s,
                                                             rate, duration))
                    (point / "loops.json").write_text(json.dumps(_loop_use(before, _loop_snapshot(cluster)), indent=1))
                    bar.step(f"{mode} @ {rate:g} req/s measured")
                for scale in scales:
                    ttft, tpot = config.slo.ttft_s * scale, config.slo.tpot_s * scale
                    rows.append(_row(mode, rate, gpus, scale, "simulated", summarize(sim_records, ttft, tpot, rate)))
                    if real_records is not None:
                        rows.append(_row(mode, rate, gpus, scale, "measured",
                                         summarize(real_records, ttft, tpot, rate, duration)))
        finally:
            if cluster is not None:
                cluster.shutdown()
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    from planner.plots import plot_sweep
    written = plot_sweep(rows, out, base.slo.attainment, title=f"{base.model.name} on {base.device}")
    print(format_table(rows, base.slo.attainment))
    print(f"  wrote {out}/sweep.csv and {', '.join(p.name for p in written)}", file=sys.stderr)
    return 0


def _measure(cluster: Any, prompts: list[list[int]], outs: list[int], arrivals: list[float],
             timeout_s: float) -> tuple[list[RequestRecord], float]:
    """One point on a running cluster: a fresh front end (Cluster's constructor, so the router
    is the one `splitserve run` builds), the trace driven by run_command.drive."""
    from cluster.cluster import Cluster
    from cluster.run_command import drive
    router = cluster.frontend.router
    info = {n: {"num_blocks": load.num_blocks} for n, load in {**router.prefill, **router.decode}.items()}
    Cluster.__init__(cluster, cluster.config, cluster.pool, info)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in outs]
    duration, _ = drive(cluster, prompts, params, arrivals, timeout_s)
    for rid, t in cluster.frontend.requests.items():
        if not t.done:
            cluster.frontend.abort(rid)
    return cluster.frontend.records(), duration


def _loop_snapshot(cluster: Any) -> dict[str, Any]:
    import psutil
    return {"t": time.perf_counter(), "driver_cpu_s": time.process_time(), "host": psutil.cpu_times()._asdict(),
            "instances": {n: st.get("loop", {}) for n, st in cluster.instance_stats().items()}}


def _loop_use(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Where the point's time went: per instance, steps and their wall / thread-CPU seconds and
    the process's CPU seconds; the driver's CPU; the host's busy cores (all processes)."""
    wall = b["t"] - a["t"]
    host = {k: b["host"][k] - a["host"][k] for k in b["host"]}
    busy = sum(v for k, v in host.items() if k not in ("idle", "iowait"))
    out: dict[str, Any] = {"wall_s": wall, "driver_cpu_s": b["driver_cpu_s"] - a["driver_cpu_s"],
                           "host_busy_cores": busy / wall if wall > 0 else None, "instances": {}}
    for name, t in b["instances"].items():
        t0 = a["instances"].get(name, {})
        d = {k: v - t0.get(k, 0.0) for k, v in t.items()}
        if d.get("steps"):
            d["mean_step_s"] = d["step_s"] / d["steps"]
        out["instances"][name] = d
    return out


def goodput(rows: list[dict[str, Any]], target: float) -> float | None:
    """Highest swept rate whose attainment meets the target, linearly interpolated to the first
    rate that misses it (DESIGN.md's goodput on a swept curve)."""
    pts = sorted((r["rate"], r["attainment"]) for r in rows)
    best = None
    for (r0, a0), (r1, a1) in zip(pts, pts[1:] + [(None, None)]):
        if a0 < target:
            break
        best = r0
        if r1 is not None and a1 < target:
            best = r0 + (r1 - r0) * (a0 - target) / (a0 - a1)
            break
    return best


def format_table(rows: list[dict[str, Any]], target: float) -> str:
    lines = [f"{'mode':<10}{'rate':>7}{'scale':>6}  {'measured':>9}{'simulated':>10}{'error':>7}"]
    keyed: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        keyed.setdefault((r["mode"], r["rate"], r["slo_scale"]), {})[r["source"]] = r
    for (mode, rate, scale), by in keyed.items():
        m, s = by.get("measured"), by.get("simulated")
        err = "" if not (m and s) else f"{100 * (s['attainment'] - m['attainment']):+.0f}pt"
        lines.append(f"{mode:<10}{rate:>7g}{scale:>6g}  {_pct(m):>9}{_pct(s):>10}{err:>7}")
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for src in ("measured", "simulated"):
            pts = [r for r in rows if r["mode"] == mode and r["source"] == src and r["slo_scale"] == 1.0]
            if len({r["rate"] for r in pts}) > 1:
                g = goodput(pts, target)
                lines.append(f"goodput {mode} {src}: {'-' if g is None else f'{g:.3g} req/s'}")
    return "\n".join(lines)


def _pct(r: dict[str, Any] | None) -> str:
    return "-" if r is None else f"{r['attainment']:.0%}"
