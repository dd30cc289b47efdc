#!/usr/bin/env bash
# Planner fidelity on one multi-GPU machine (dummy llama-3-8b, bf16, ShareGPT lengths trace):
# profile -> plan (fast link) -> measured + simulated sweeps of the chosen plan and a runner-up
# -> plan under an emulated slow link and a measured check of its codec choice.
# Everything lands under $OUT/planner/; a table is printed last.
# Usage (device tool): bash benchmarks/sweep_planner_gpu.sh   [OUT, GPUS, LIMIT_S from the env]
# SMOKE=1: the same steps on this machine's CPU with the tiny-gqa preset (checks the script, not speed).
# The profile includes the serving overhead (a 1P1D cluster, one request at a time); the sweeps
# warm the cluster up before their first point. PROFILE_FLAGS=--no-serving skips that phase (it
# did not finish in 240 s on 2x H200: starting the GPU cluster is slow); SLOW_RUNS= skips the
# slow-link runs (default: plan_slow plan_slow_alt). MODES: the modes the chosen plan's GPUs are
# swept in (default disagg,colocated,chunked); FACTORS: the swept rates as multiples of the
# predicted goodput; RUNNERUP=0 skips the runner-up plan's sweep.
set -u
OUT=${OUT:-runs/planner_gpu}; GPUS=${GPUS:-2}; LIMIT_S=${LIMIT_S:-540}; SMOKE=${SMOKE:-0}
W=$OUT/planner; mkdir -p $W
T0=$(date +%s); left() { echo $(( LIMIT_S - ($(date +%s) - T0) )); }
TRACE=benchmarks/sweep_sharegpt_lengths.jsonl
if [ "$SMOKE" = 1 ]; then
  MODEL="{name: tiny-gqa, weights: dummy, dtype: float32}"; DEVICE=cpu; SLO="{ttft_s: 1.0, tpot_s: 0.1, attainment: 0.9}"
  MAXP=256; MAXO=16; NREQ=30; LINK=0.05; echo "cpu (smoke)" > $W/cards.txt
else
  MODEL="{name: llama-3-8b, weights: dummy, dtype: bfloat16}"; DEVICE=cuda; SLO="{ttft_s: 0.25, tpot_s: 0.05, attainment: 0.9}"
  MAXP=1024; MAXO=128; NREQ=${NREQ:-120}; LINK=${LINK:-2.0}
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $W/cards.txt
fi
cat > $W/base.yaml <<YAML
model: $MODEL
device: $DEVICE
prefill: {max_batch_tokens: 4096, memory_fraction: 0.85}
decode: {max_batch_size: 64, memory_fraction: 0.85}
kv_transfer: {transport: tcp, codec: raw, timeout_s: 60}
slo: $SLO
YAML
sed "s/codec: raw, timeout_s: 60/codec: raw, link_gbps: $LINK, timeout_s: 60/" $W/base.yaml > $W/base_slow.yaml
COMMON="--workload $TRACE --max-output-tokens $MAXO --max-prompt-tokens $MAXP --gpus-per-node $GPUS"
echo "== profile ($(left) s left)"
timeout 300 splitserve profile $W/base.yaml --quick ${PROFILE_FLAGS:-} --codecs raw,lossless,int8,default --out $W/profile.json 2>$W/profile.log | tee $W/profile.txt
echo "== plans, fast link and emulated $LINK Gb/s link, side by side on the CPU ($(left) s left)"
timeout 120 splitserve plan $W/base.yaml --gpus $GPUS --gpus-per-node $GPUS --profile $W/profile.json \
  --workload $TRACE --num-requests 400 --max-prompt-tokens $MAXP --max-output-tokens $MAXO \
  --out $W/plan_fast.yaml 2>$W/plan_fast.log > $W/plan_fast.txt &
timeout 120 splitserve plan $W/base_slow.yaml --gpus $GPUS --gpus-per-node $GPUS --profile $W/profile.json \
  --workload $TRACE --num-requests 400 --max-prompt-tokens $MAXP --max-output-tokens $MAXO \
  --out $W/plan_slow.yaml 2>$W/plan_slow.log > $W/plan_slow.txt &
wait
cat $W/plan_fast.txt $W/plan_slow.txt
# the runner-up: the best simulated plan with a different codec (or the next one)
python3 - $W ${FACTORS:-0.6,0.9,1.2} <<'PY'
import json, sys, yaml
w = sys.argv[1]
side = json.load(open(f"{w}/plan_fast.json"))
best = side["best"]
other = next((p for p in side["runners_up"] if p["codec"] != best["codec"]), side["runners_up"][0] if side["runners_up"] else None)
cfg = yaml.safe_load(open(f"{w}/plan_fast.yaml"))
if other is None:  # nothing else was simulated: the same plan with another codec level
    cfg["kv_transfer"]["codec"] = "int8" if best["codec"] == "raw" else "raw"
else:
    cfg["prefill"]["instances"], cfg["prefill"]["tp"] = other["prefill"]["instances"], other["prefill"]["tp"]
    cfg["decode"]["instances"], cfg["decode"]["tp"] = other["decode"]["instances"], other["decode"]["tp"]
    cfg["kv_transfer"]["codec"], cfg["placement"] = other["codec"], other["placement"]
yaml.safe_dump(cfg, open(f"{w}/plan_runnerup.yaml", "w"), sort_keys=False)
g = best["goodput"]
rates = [round(g * float(f), 2) for f in sys.argv[2].split(",")]
open(f"{w}/rates.txt", "w").write(",".join(map(str, rates)))
slow = json.load(open(f"{w}/plan_slow.json"))["best"]
scfg = yaml.safe_load(open(f"{w}/plan_slow.yaml"))
alt = dict(scfg); alt["kv_transfer"] = dict(scfg["kv_transfer"], codec=best["codec"] if slow["codec"] != best["codec"] else "raw")
yaml.safe_dump(alt, open(f"{w}/plan_slow_alt.yaml", "w"), sort_keys=False)
open(f"{w}/slow_rate.txt", "w").write(str(round(slow["goodput"] * 0.9, 2)))
print("chosen", best["describe"], "runner-up", other and other["describe"], "rates", rates,
      "slow-link choice", slow["describe"], "alt codec", alt["kv_transfer"]["codec"])
PY
RATES=$(cat $W/rates.txt); SLOW_RATE=$(cat $W/slow_rate.txt)
SWEEPS="plan_fast"; [ "${RUNNERUP:-1}" = 1 ] && SWEEPS="plan_fast plan_runnerup"
for name in $SWEEPS; do
  [ $(left) -lt 90 ] && { echo "skip $name: out of time"; continue; }
  modes=disagg; [ $name = plan_fast ] && modes=${MODES:-disagg,colocated,chunked}
  echo "== sweep $name ($modes) at $RATES ($(left) s left)"
  timeout $(( $(left) - 30 )) splitserve sweep $W/$name.yaml --rates $RATES --modes $modes --num-requests $NREQ $COMMON \
    --profile $W/profile.json --timeout 60 --out $W/sweep_$name 2>$W/sweep_$name.log | tee $W/sweep_$name.txt
done
for name in ${SLOW_RUNS-plan_slow plan_slow_alt}; do
  [ $(left) -lt 60 ] && { echo "skip $name: out of time"; continue; }
  echo "== slow link ($LINK Gb/s): $name at $SLOW_RATE ($(left) s left)"
  timeout $(( $(left) - 15 )) splitserve sweep $W/$name.yaml --rates $SLOW_RATE --num-requests $NREQ $COMMON \
    --profile $W/profile.json --timeout 60 --out $W/sweep_$name 2>$W/sweep_$name.log | tee $W/sweep_$name.txt
done
echo "================ summary ($(cat $W/cards.txt | head -1))"
for f in plan_fast plan_slow; do head -2 $W/$f.txt; done
for f in sweep_plan_fast sweep_plan_runnerup sweep_plan_slow sweep_plan_slow_alt; do
  echo "-- $f"; [ -f $W/$f.txt ] && cat $W/$f.txt; done
