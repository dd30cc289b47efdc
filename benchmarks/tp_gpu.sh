#!/usr/bin/env bash
# Tensor-parallel figures on one 4-GPU machine (dummy llama-3-8b, bf16): prefill at 2K/8K tokens
# and a decode step per TP size 1/2/4, then KV transfer time per (prefill TP -> decode TP) pair.
# Outputs under $OUT/tp/; a table is printed last.
# Usage (device tool, 4 GPUs): bash benchmarks/tp_gpu.sh
set -u
OUT=${OUT:-runs/tp_gpu}; D=$OUT/tp; mkdir -p $D
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $D/cards.txt
NGPU=$(nvidia-smi -L | wc -l)
SIZES=1,2; [ "$NGPU" -ge 4 ] && SIZES=1,2,4
echo "== smoke: TP 2 on a tiny model"
timeout 120 python3 -m benchmarks.tp_latency --tp 2 --model tiny-gqa --lengths 64 --batch 2 --context 16 \
  > $D/smoke.log 2>&1; tail -5 $D/smoke.log
echo "== prefill / decode step per TP ($SIZES)"
timeout 300 python3 -m benchmarks.tp_latency --tp $SIZES --lengths 2048,8192 --batch 32 --context 1024 \
  --out $D/tp_latency.json > $D/tp_latency.log 2>&1
echo "== KV transfer per reshard pair"
timeout 240 python3 -m benchmarks.reshard_gpu --pairs 1:1,2:1,1:2,2:2,4:2 --tokens 2048,8192 --levels raw \
  --out $D/reshard.json > $D/reshard.log 2>&1
echo "== KV transfer with the default codec (coded on the prefill GPU, decoded on the decode GPU)"
timeout 150 python3 -m benchmarks.reshard_gpu --pairs 1:1,2:1,4:2 --tokens 8192 --levels default \
  --out $D/reshard_default.json > $D/reshard_default.log 2>&1
tail -12 $D/reshard.log
tail -4 $D/reshard_default.log
tail -8 $D/tp_latency.log
