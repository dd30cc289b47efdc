#!/usr/bin/env bash
# The KV channel A/B on one 2-GPU machine (dummy llama-3-8b, bf16, ShareGPT lengths trace):
# for each tree in TREES ("name=path ..."; default: this tree only) the isolated channel probe
# (one 256- and one 1024-token request, alone and 4 back to back) and a measured + simulated
# sweep of the 1P1D raw plan, then per point the in-cluster KV transfer time and the
# processes' CPU. Trees run in the same call, so their figures compare on the same card.
# Usage (device tool): TREES="new=. head=.ab/head" bash benchmarks/kv_channel_ab_gpu.sh
set -u
OUT=${OUT:-runs/kv_channel_ab}; RATES=${RATES:-16.5,33,47,66}; NREQ=${NREQ:-400}
PLAN=${PLAN:-docs/planner/plan_gpu_h100_2_disagg.yaml}; PROFILE=${PROFILE:-docs/planner/profile_h100_llama3_8b.json}
ROOT=$PWD; mkdir -p $OUT; OUT=$(cd $OUT && pwd)
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $OUT/card.txt
for entry in ${TREES:-new=.}; do
  name=${entry%%=*}; tree=$(cd ${entry#*=} && pwd)
  echo "== $name ($tree)"
  (cd $tree && export PYTHONPATH=/tmp/site:$tree && python3 - <<'PY' | tee $OUT/probe_$name.txt
import torch
from kvtransfer.channel_probe import measure_channel
for n in (256, 1024):
    for in_flight in (1, 4):
        r = measure_channel(32, 8, 128, n, torch.bfloat16, "cuda", in_flight=in_flight)
        print(f"probe tokens={n} in_flight={in_flight} per_request_ms={r.per_request_s * 1e3:.2f} GB/s={r.bytes_per_s / 1e9:.2f}")
PY
  export PYTHONPATH=/tmp/site:$tree; cd $tree
  timeout 400 python3 -m splitserve sweep $ROOT/$PLAN --rates $RATES --num-requests $NREQ \
    --workload benchmarks/sweep_sharegpt_lengths.jsonl --max-output-tokens 128 --max-prompt-tokens 1024 \
    --gpus-per-node 2 --profile $ROOT/$PROFILE --timeout 60 --out $OUT/sweep_$name 2>$OUT/sweep_$name.log \
    | tee $OUT/sweep_$name.txt)
done
cd $ROOT && python3 - $OUT <<'PY'
import glob, json, os, statistics, sys
out = sys.argv[1]
print("tree    rate  attain  kv_transfer_ms p50/p90  TPOT p90 ms   prefill proc CPU/wall  decode proc CPU/wall")
for d in sorted(glob.glob(f"{out}/sweep_*/*_rate*")):
    reqs = [json.loads(l) for l in open(f"{d}/requests.jsonl")] if os.path.exists(f"{d}/requests.jsonl") else []
    kv = sorted(r["kv_transfer_s"] for r in reqs if r.get("kv_transfer_s") is not None)
    summ = json.load(open(f"{d}/summary.json")) if os.path.exists(f"{d}/summary.json") else {}
    loops = json.load(open(f"{d}/loops.json")) if os.path.exists(f"{d}/loops.json") else {}
    cpu = {inst.split("-")[0]: f"{t.get('process_cpu_s', 0) / loops['wall_s']:.2f}"
           for inst, t in (loops.get("instances") or {}).items() if loops.get("wall_s")}
    q = lambda p: f"{kv[min(len(kv) - 1, int(p * len(kv)))] * 1e3:.1f}" if kv else "-"
    print(f"{d.split('/')[-2][6:]:6s} {d.split('rate')[-1]:>6s}  {summ.get('attainment', float('nan')):.2f}  "
          f"{q(0.5):>8s} / {q(0.9):>7s}   {summ.get('tpot_p90', float('nan')) * 1e3:8.1f}   "
          f"{cpu.get('prefill', '-'):>8s}   {cpu.get('decode', '-'):>8s}")
PY
