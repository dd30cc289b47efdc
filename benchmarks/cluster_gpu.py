"""Disaggregated vs colocated vs chunked prefill on the same GPUs, and KV transfer raw vs
`default` codec over an emulated 10 Gb/s link (dummy llama-3-8b, bf16, ShareGPT lengths).

    python -m benchmarks.cluster_gpu --out DIR [--rates 4,8,16] [--num-requests 60]

Writes one requests.jsonl per run under DIR and prints attainment per mode and rate at the
chatbot SLOs (and at half and double their scale), then the transfer comparison.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.workloads import gamma_arrivals, load_workload
from cluster.cluster import Cluster
from cluster.config import parse_cluster_config
from cluster.report import write_run
from cluster.run_command import drive
from engine.metrics import attainment, percentile, summarize
from engine.request import SamplingParams

TRACE = Path(__file__).parent / "traces" / "sharegpt_lengths.jsonl"
SLO_TTFT, SLO_TPOT = 0.25, 0.1   # DistServe's chatbot preset


SMOKE = False   # --cpu-smoke: the same runs on a tiny model on CPU, to check the script


def config(mode: str, **overrides: Any):
    if SMOKE:
        overrides = {"model": {"name": "tiny-gqa"}, "device": "cpu",
                     "prefill": {"kv_blocks": 256}, "decode": {"kv_blocks": 256}, **overrides}
    data: dict[str, Any] = {
        "model": {"name": "llama-3-8b", "weights": "dummy", "dtype": "bfloat16"}, "device": "cuda", "mode": mode,
        "prefill": {"instances": 1, "max_batch_tokens": 8192 if mode != "chunked" else 1024,
                    "chunk_size": None if mode != "chunked" else 512, "max_batch_size": 128},
        "decode": {"instances": 1, "max_batch_tokens": 8192 if mode != "chunked" else 1024,
                   "chunk_size": None if mode != "chunked" else 512, "max_batch_size": 128},
        "kv_transfer": {"codec": "raw", "timeout_s": 60}, "slo": {"ttft_s": SLO_TTFT, "tpot_s": SLO_TPOT},
    }
    for k, v in overrides.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return parse_cluster_config(data)


def rate_sweep(mode: str, rates: list[float], n: int, out: Path) -> list[dict[str, Any]]:
    items = load_workload(str(TRACE), n, None, seed=0, max_prompt_tokens=2048 if not SMOKE else 200,
                          max_output_tokens=256 if not SMOKE else 8, vocab_size=128256 if not SMOKE else 512)
    prompts = [it.prompt_token_ids for it in items]
    params = [SamplingParams(max_tokens=it.max_tokens, ignore_eos=True) for it in items]
    rows = []
    t0 = time.time()
    cluster = Cluster.start(config(mode))
    print(f"[{mode}] started in {time.time() - t0:.0f} s", flush=True)
    try:
        # warm-up: compile kernels and capture graphs before anything is measured
        warm = min(n, 16)
        drive(cluster, prompts[:warm], params[:warm], gamma_arrivals(warm, 8.0, seed=9), 300, prefix="warmup")
        for rate in rates:
            duration, ids = drive(cluster, prompts, params, gamma_arrivals(n, rate, seed=0), 300, prefix=f"r{rate}")
            records = [cluster.frontend.record(r) for r in ids]
            s = summarize(records, SLO_TTFT, SLO_TPOT, rate, duration)
            write_run(out / f"{mode}-rate{rate}", records, s)
            row = {"mode": mode, "rate": rate, "per_gpu_rate": rate / 2, **{k: s[k] for k in (
                "attainment", "attainment_ttft", "attainment_tpot", "ttft_p90", "tpot_p90", "num_failed")}}
            for scale in (0.5, 2.0):
                row[f"attainment_x{scale}"] = attainment(records, SLO_TTFT * scale, SLO_TPOT * scale)[0]
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        cluster.shutdown()
    return rows


def codec_at_10gbps(level: str, n: int, out: Path) -> dict[str, Any]:
    cluster = Cluster.start(config("disagg", kv_transfer={"codec": level, "link_gbps": 10.0}))
    try:
        warm = [[(7 * k) % 500 + 1 for k in range(256)]] * 2
        drive(cluster, warm, [SamplingParams(max_tokens=4)] * 2, [0.0, 0.5], 300, prefix="warmup")
        prompts = [[(13 * i + k) % 500 + 1 for k in range(1536 if not SMOKE else 300)] for i in range(n)]
        params = [SamplingParams(max_tokens=32, ignore_eos=True)] * n
        duration, ids = drive(cluster, prompts, params, gamma_arrivals(n, 1.0, seed=1), 300, prefix=level)
        records = [cluster.frontend.record(r) for r in ids]
        write_run(out / f"codec-{level}", records, summarize(records, SLO_TTFT, SLO_TPOT, 1.0, duration))
    finally:
        cluster.shutdown()
    ok = [r for r in records if r.ok]
    transfer = [r.kv_transfer_s for r in ok if r.kv_transfer_s is not None]
    return {"level": level, "requests": len(ok), "kv_MB_raw": sum(r.kv_bytes_raw for r in ok) / len(ok) / 1e6,
            "kv_MB_wire": sum(r.kv_bytes_wire for r in ok) / len(ok) / 1e6,
            "transfer_p50_s": percentile(transfer, 50), "transfer_p90_s": percentile(transfer, 90),
            "ttft_p50_s": percentile([r.ttft_s for r in ok], 50),
            "second_token_p50_s": percentile([r.events.get("decode_start", 0) - r.first_token_s for r in ok], 50),
            "tpot_p50_s": percentile([r.tpot_s for r in ok], 50)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/cluster_gpu")
    ap.add_argument("--rates", default="8,16,32,64")
    ap.add_argument("--num-requests", type=int, default=60)
    ap.add_argument("--codec-requests", type=int, default=12)
    ap.add_argument("--parts", default="modes,codec")
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args()
    global SMOKE
    SMOKE = args.cpu_smoke
    out = Path(args.out)
    rates = [float(r) for r in args.rates.split(",")]
    rows, codec_rows = [], []
    for part in args.parts.split(","):
        jobs = [("modes", m) for m in ("disagg", "colocated", "chunked")] if part == "modes" else \
               [("codec", lvl) for lvl in ("raw", "default")]
        for kind, what in jobs:
            try:
                if kind == "modes":
                    rows += rate_sweep(what, rates, args.num_requests, out)
                else:
                    codec_rows.append(codec_at_10gbps(what, args.codec_requests, out))
                    print(json.dumps(codec_rows[-1]), flush=True)
            except Exception:
                traceback.print_exc()
    (out / "summary.json").write_text(json.dumps({"modes": rows, "codec": codec_rows}, indent=2))
    print(f"\nattainment at TTFT {SLO_TTFT}s / TPOT {SLO_TPOT}s (x0.5 / x2 SLO scale), 2 GPUs")
    print(f"{'mode':10} {'rate':>5} {'/GPU':>5} {'both':>6} {'ttft':>6} {'tpot':>6} {'x0.5':>6} {'x2':>6} {'ttft_p90':>9} {'tpot_p90':>9}")
    for r in rows:
        print(f"{r['mode']:10} {r['rate']:5g} {r['per_gpu_rate']:5g} {r['attainment']:6.2f} {r['attainment_ttft']:6.2f} "
              f"{r['attainment_tpot']:6.2f} {r['attainment_x0.5']:6.2f} {r['attainment_x2.0']:6.2f} "
              f"{r['ttft_p90'] or 0:9.3f} {r['tpot_p90'] or 0:9.4f}")
    for c in codec_rows:
        print(c)


if __name__ == "__main__":
    main()
