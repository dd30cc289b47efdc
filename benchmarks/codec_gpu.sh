#!/usr/bin/env bash
# KV codec on one H100/H200: full-size GPU tests (device bytes = CPU reference; device decode =
# CPU decoder), encode/decode GB/s per level at 256- and 2048-token Llama-3-8B chunks next to
# device copy, zstd and CacheGen-style rows, default's stage times, and the cluster's per-layer
# path (LayerPacker -> LayerUnpacker on the GPU) for raw vs coded levels.
# Outputs land in $OUT/codec/; a short table is printed last. Run from the repo root with
# PYTHONPATH set (zstandard from .whl/ is optional: without it the zstd row is skipped).
set -u
OUT=${OUT:-runs}; D=$OUT/codec; mkdir -p "$D"
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$D/card.txt"
git rev-parse --short HEAD > "$D/commit.txt" 2>/dev/null || true
echo "== tests ($(( $(date +%s) - T0 )) s)"
timeout 120 python -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_codec_kernels.py \
  tests/kernels/test_codec_device_decode.py > "$D/tests.txt" 2>&1; tail -3 "$D/tests.txt"
echo "== speed ($(( $(date +%s) - T0 )) s)"
timeout 180 python benchmarks/codec_speed.py --iters 10 --baselines --channel raw,lossless,int8,default,aggressive \
  --stages --levels lossless,int8,default,aggressive --out "$D/speed.json" > "$D/speed.txt" 2>&1
echo "speed exit $?"
echo "== done in $(( $(date +%s) - T0 )) s; card: $(head -1 "$D/card.txt")"
tail -1 "$D/tests.txt"
sed -n '/KV 32 layers/,$p' "$D/speed.txt"
