"""`splitserve run CONFIG`: start the pools, drive a workload with Poisson arrivals, report."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.workloads import gamma_arrivals, load_workload
from cluster.cluster import Cluster
from cluster.config import load_cluster_config
from cluster.report import format_summary, write_run
from engine.errors import SplitserveError
from engine.metrics import summarize
from engine.request import SamplingParams


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="cluster YAML (see deploy/)")
    p.add_argument("--workload", default="sharegpt", help="sharegpt | humaneval | summarization | FILE.jsonl")
    p.add_argument("--num-requests", type=int, default=50)
    p.add_argument("--rate", type=float, default=2.0, help="mean arrival rate, requests/s (Poisson)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=["disagg", "colocated", "chunked"], default=None,
                   help="override the config's mode on the same instances")
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--max-output-tokens", type=int, default=128)
    p.add_argument("--timeout", type=float, default=1800.0, help="give up on the run after this many seconds")
    p.add_argument("--out", default="runs/latest", help="directory for requests.jsonl and summary.json")
    p.add_argument("--in-process", action="store_true", help="run instances in this process, without Ray")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_cluster_config(args.config).with_mode(args.mode)
        if args.num_requests < 1:
            raise SplitserveError("--num-requests: must be >= 1")
        source = config.model.source
        tokenizer = source.tokenizer()
        model_config = source.model_config()
        items = load_workload(args.workload, args.num_requests, tokenizer, args.seed, args.max_prompt_tokens,
                              args.max_output_tokens, model_config.vocab_size)
        arrivals = gamma_arrivals(len(items), args.rate, args.seed)
    except (SplitserveError, ValueError) as exc:
        print(f"splitserve run: {exc}", file=sys.stderr)
        return 2
    print(f"starting {config.mode}: {config.prefill.instances} prefill x tp{config.prefill.tp}, "
          f"{config.decode.instances} decode x tp{config.decode.tp}, {config.model.name} on {config.device}",
          file=sys.stderr)
    try:
        cluster = Cluster.open(config, args.in_process)
    except (SplitserveError, RuntimeError) as exc:
        print(f"splitserve run: {exc}", file=sys.stderr)
        return 2
    try:
        prompts = [it.prompt_token_ids or tokenizer.encode(it.prompt) for it in items]
        # Greedy to the workload's output length: the trace decides how long each answer is.
        params = [SamplingParams(max_tokens=it.max_tokens, ignore_eos=True) for it in items]
        duration, _ = drive(cluster, prompts, params, arrivals, args.timeout)
        records = cluster.frontend.records()
        summary = summarize(records, config.slo.ttft_s, config.slo.tpot_s, args.rate, duration)
        summary.update(mode=config.mode, config=str(args.config), workload=args.workload, seed=args.seed)
        write_run(Path(args.out), records, summary)
        print(format_summary(summary))
        print(f"  wrote {args.out}/requests.jsonl and summary.json", file=sys.stderr)
    finally:
        cluster.shutdown()
    return 0 if summary["num_failed"] == 0 else 1


def drive(cluster: Cluster, prompts: list[list[int]], params: list[SamplingParams], arrivals: list[float],
          timeout_s: float, prefix: str = "req") -> tuple[float, list[str]]:
    """Submit each request at its arrival time and poll until all are done; returns the
    seconds it took and the request ids (`{prefix}-{i}`)."""
    start = time.time()
    deadline = start + timeout_s
    next_i, last_print = 0, 0.0
    frontend = cluster.frontend
    while time.time() < deadline:
        now = time.time()
        while next_i < len(prompts) and start + arrivals[next_i] <= now:
            cluster.submit(prompts[next_i], params[next_i], request_id=f"{prefix}-{next_i}",
                           arrival_s=start + arrivals[next_i])
            next_i += 1
        if next_i == len(prompts) and all(frontend.requests[f"{prefix}-{i}"].done for i in range(len(prompts))):
            break
        wait = 0.02 if next_i == len(prompts) else max(0.0, min(0.02, start + arrivals[next_i] - time.time()))
        frontend.poll(wait)
        if now - last_print > 1.0 and sys.stderr.isatty():
            done = len(frontend.requests) - frontend.num_unfinished
            print(f"\r  {done}/{len(prompts)} done, {next_i} arrived, {now - start:.0f} s", end="", file=sys.stderr)
            last_print = now
    else:
        print(f"\n  run timed out after {timeout_s:.0f} s", file=sys.stderr)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return time.time() - start, [f"{prefix}-{i}" for i in range(len(prompts))]
