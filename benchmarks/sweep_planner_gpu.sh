#!/usr/bin/env bash
# Planner fidelity on one multi-GPU machine (dummy llama-3-8b, bf16, ShareGPT lengths trace):
# profile -> plans (fast link: every mode, and disaggregated only; emulated slow link:
# disaggregated) -> measured + simulated sweeps of the chosen plan and the best disaggregated
# one -> a measured check of the slow-link plan's codec choice against the other level.
# Everything lands under $OUT/planner/; a table is printed last.
# Usage (device tool): bash benchmarks/sweep_planner_gpu.sh   [OUT, GPUS, LIMIT_S from the env]
# SMOKE=1: the same steps on this machine's CPU with the tiny-gqa preset (checks the script, not speed).
# The profile includes the serving overhead (a 1P1D cluster, one request at a time); the sweeps
# warm the cluster up before their first point. PROFILE_FLAGS=--no-serving skips that phase (it
# did not finish in 240 s on 2x H200: starting the GPU cluster is slow); SLOW_RUNS= skips the
# slow-link runs (default: plan_slow plan_slow_alt). FACTORS: the swept rates as multiples of
# each plan's predicted goodput. PROFILE=path reuses a profile; SWITCH_MS=x also sweeps the
# disaggregated plan with engine.switch_interval_ms=x. SWEEP_MODES=disagg,colocated sweeps the chosen plan's
# GPUs in those modes (default: the plan's own). DURATION=s: each point lasts at least s seconds of
# arrivals (the planner's capacity search simulates ~8 s of sustained load). WARMUP=n: unmeasured trace
# requests before the first point (default 24). PLAN_FLAGS: extra plan flags (default --tp 1: TP>1 would be
# derived from TP 1, and measured TP>1 decode steps are slower in this build).
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
COMMON="--workload $TRACE --max-output-tokens $MAXO --max-prompt-tokens $MAXP --gpus-per-node $GPUS --duration ${DURATION:-0} --warmup ${WARMUP:-24}"
echo "== profile ($(left) s left)"
if [ -n "${PROFILE:-}" ]; then cp $PROFILE $W/profile.json; echo "profile: $PROFILE"; else
timeout 300 splitserve profile $W/base.yaml --quick ${PROFILE_FLAGS:-} --codecs raw,lossless,int8,default --out $W/profile.json 2>$W/profile.log | tee $W/profile.txt; fi
echo "== plans: all modes and disagg only on the fast link, disagg at an emulated $LINK Gb/s link ($(left) s left)"
PLAN="${PLAN_FLAGS---tp 1} --gpus $GPUS --gpus-per-node $GPUS --profile $W/profile.json --workload $TRACE --num-requests 400 --max-prompt-tokens $MAXP --max-output-tokens $MAXO"
timeout 150 splitserve plan $W/base.yaml $PLAN --out $W/plan_fast.yaml 2>$W/plan_fast.log > $W/plan_fast.txt &
timeout 150 splitserve plan $W/base.yaml $PLAN --modes disagg --out $W/plan_disagg.yaml 2>$W/plan_disagg.log > $W/plan_disagg.txt &
timeout 150 splitserve plan $W/base_slow.yaml $PLAN --modes disagg --out $W/plan_slow.yaml 2>$W/plan_slow.log > $W/plan_slow.txt &
wait
cat $W/plan_fast.txt $W/plan_disagg.txt $W/plan_slow.txt
# rates per plan: FACTORS x its own predicted goodput; the slow-link alternative: the same plan with raw
python3 - $W ${FACTORS:-0.6,0.9,1.2} <<'PY'
import json, sys, yaml
w, factors = sys.argv[1], [float(f) for f in sys.argv[2].split(",")]
for name in ("plan_fast", "plan_disagg"):
    g = json.load(open(f"{w}/{name}.json"))["best"]["goodput"]
    open(f"{w}/{name}.rates", "w").write(",".join(str(round(g * f, 2)) for f in factors))
slow = json.load(open(f"{w}/plan_slow.json"))["best"]
cfg = yaml.safe_load(open(f"{w}/plan_slow.yaml"))
cfg["kv_transfer"]["codec"] = "raw" if slow["codec"] != "raw" else "default"
yaml.safe_dump(cfg, open(f"{w}/plan_slow_alt.yaml", "w"), sort_keys=False)
open(f"{w}/slow_rate.txt", "w").write(str(round(slow["goodput"] * 0.9, 2)))
print("slow-link choice", slow["describe"], "alternative codec", cfg["kv_transfer"]["codec"])
PY
SLOW_RATE=$(cat $W/slow_rate.txt)
same=$(python3 -c "import json, sys; print(int(len({json.load(open(f))['best']['describe'] for f in sys.argv[1:]}) == 1))" $W/plan_fast.json $W/plan_disagg.json)
SWEEPS="plan_fast"; [ "$same" = 1 ] || SWEEPS="plan_fast plan_disagg"
if [ -n "${SWITCH_MS:-}" ]; then   # the disaggregated plan again with a shorter GIL switch interval
  python3 -c "import sys, yaml; c = yaml.safe_load(open(sys.argv[1])); c.setdefault('engine', {})['switch_interval_ms'] = float(sys.argv[3]); yaml.safe_dump(c, open(sys.argv[2], 'w'), sort_keys=False)" \
    $W/plan_disagg.yaml $W/plan_disagg_si.yaml $SWITCH_MS && cp $W/plan_disagg.rates $W/plan_disagg_si.rates && SWEEPS="$SWEEPS plan_disagg_si"
fi
for name in $SWEEPS; do
  [ $(left) -lt 90 ] && { echo "skip $name: out of time"; continue; }
  echo "== sweep $name at $(cat $W/$name.rates) ($(left) s left)"
  MODES_FLAG=""; [ "$name" = plan_fast ] && [ -n "${SWEEP_MODES:-}" ] && MODES_FLAG="--modes $SWEEP_MODES"
  timeout $(( $(left) - 30 )) splitserve sweep $W/$name.yaml --rates $(cat $W/$name.rates) --num-requests $NREQ $COMMON $MODES_FLAG \
    --profile $W/profile.json --timeout 60 --out $W/sweep_$name 2>$W/sweep_$name.log | tee $W/sweep_$name.txt
done
for name in ${SLOW_RUNS-plan_slow plan_slow_alt}; do
  [ $(left) -lt 60 ] && { echo "skip $name: out of time"; continue; }
  echo "== slow link ($LINK Gb/s): $name at $SLOW_RATE ($(left) s left)"
  timeout $(( $(left) - 15 )) splitserve sweep $W/$name.yaml --rates $SLOW_RATE --num-requests $NREQ $COMMON \
    --profile $W/profile.json --timeout 60 --out $W/sweep_$name 2>$W/sweep_$name.log | tee $W/sweep_$name.txt
done
echo "================ summary ($(cat $W/cards.txt | head -1))"
for f in plan_fast plan_disagg plan_slow; do head -2 $W/$f.txt; done
for f in sweep_plan_fast sweep_plan_disagg sweep_plan_disagg_si sweep_plan_slow sweep_plan_slow_alt; do
  echo "-- $f"; [ -f $W/$f.txt ] && cat $W/$f.txt; done
