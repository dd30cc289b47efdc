"""`splitserve plan CONFIG --gpus N`: search parallelism, instances, placement and codec level
per pool for the config's model, workload and SLOs; write a cluster YAML `splitserve run`
executes as is, with the predicted curve and runners-up in PLAN.json beside it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cluster.config import load_cluster_config
from engine.errors import SplitserveError
from planner.perf import build_perf
from planner.plan_io import write_plan
from planner.search import Budget, SearchOptions, predicted_curve, search
from planner.workload import workload_lengths


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="base cluster YAML: model, device, SLOs, batch limits (see deploy/)")
    p.add_argument("--gpus", type=int, required=True, help="GPU budget (CPU: instances, one core each)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--link-gbps", type=float, default=None, help="network between nodes, Gb/s")
    p.add_argument("--profile", default=None, help="profile.json from `splitserve profile` (else roofline)")
    p.add_argument("--workload", default="sharegpt", help="sharegpt | humaneval | summarization | FILE.jsonl")
    p.add_argument("--num-requests", type=int, default=400, help="requests sampled for the length mix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--max-output-tokens", type=int, default=128)
    p.add_argument("--codecs", default=None, help="comma-separated codec levels to consider (default: all)")
    p.add_argument("--tp", default=None, help="comma-separated TP sizes to consider (default: all that fit)")
    p.add_argument("--modes", default="disagg,colocated,chunked",
                   help="modes to consider; colocated/chunked run both phases on every GPU (default: all)")
    p.add_argument("--out", default="plan.yaml")


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    try:
        base = load_cluster_config(args.config)
        model = base.model.source.model_config()
        profile = json.loads(Path(args.profile).read_text()) if args.profile else None
        perf = build_perf(base, model, profile)
        workload = workload_lengths(base, args.workload, args.num_requests, args.seed, args.max_prompt_tokens,
                                    args.max_output_tokens)
        budget = Budget(args.gpus, args.gpus_per_node, args.link_gbps)
        opt = SearchOptions()
        if args.codecs:
            opt.levels = tuple(args.codecs.split(","))
        opt.modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        if "disagg" not in opt.modes:
            raise ValueError("--modes: include disagg (the search builds on its per-phase capacities)")
        if args.tp:
            opt.tp_choices = tuple(int(t) for t in args.tp.split(","))
        plans = search(base, perf, workload, budget, opt, log=lambda s: print(f"  {s}", file=sys.stderr))
    except (SplitserveError, ValueError, OSError) as exc:
        print(f"splitserve plan: {exc}", file=sys.stderr)
        return 2
    search_s = time.monotonic() - t0
    best = plans[0]
    rates = sorted({round(best.goodput * f, 4) for f in (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5)} - {0})
    curve = predicted_curve(best.config, perf, budget, workload, rates) if best.goodput > 0 else []
    header = [
        f"splitserve plan: {best.describe()}",
        f"predicted goodput {best.goodput:.4g} req/s ({best.per_gpu:.4g} per GPU) at {base.slo.attainment:.0%} "
        f"attainment, TTFT {base.slo.ttft_s} s / TPOT {base.slo.tpot_s} s",
        f"budget {args.gpus} GPUs, {args.gpus_per_node} per node, link {args.link_gbps or 'fast'} Gb/s; "
        f"workload {args.workload}; step times from {'profile ' + args.profile if args.profile else 'roofline'}",
        f"search took {search_s:.1f} s; curve and runners-up in {Path(args.out).with_suffix('.json').name}",
        "runners-up: " + "; ".join(f"{p.describe()} {p.per_gpu:.3g}/GPU ({p.stage})" for p in plans[1:4]),
    ]
    sidecar = {
        "best": _plan_json(best), "runners_up": [_plan_json(p) for p in plans[1:8]], "predicted_curve": curve,
        "search_s": search_s, "budget": vars(budget), "workload": args.workload, "notes": perf.notes,
        "step_models": {str(tp): perf.step_model(tp).to_json() for tp in sorted(perf._cache)},
    }
    side = write_plan(Path(args.out), best.config, header, sidecar)
    print("\n".join(header[:2]))
    print(f"  wrote {args.out} and {side}", file=sys.stderr)
    return 0


def _plan_json(p) -> dict:  # noqa: ANN001
    c = p.config
    return {"describe": p.describe(), "mode": c.mode, "stage": p.stage, "goodput": p.goodput, "per_gpu": p.per_gpu,
            "num_gpus": p.num_gpus, "prefill": {"instances": c.prefill.instances, "tp": c.prefill.tp},
            "decode": {"instances": c.decode.instances, "tp": c.decode.tp}, "codec": c.kv_transfer.codec,
            "placement": c.placement, **{k: v for k, v in p.detail.items() if k != "search_s"}}
