"""GPU speed of the KV codec: encode / decode GB/s of raw KV per level, next to device copy.

KV shaped like Llama-3-8B (32 layers x 8 KV heads x 128, bf16), one stream per token chunk
(256 and 2048 tokens), all layers in one call. Encode = scales + quantize + histogram + tables
+ rANS encode + compaction, ending in device buffers (no host copy, no msgpack framing). Decode
= tables + rANS decode fused with dequantize (quant levels) + the lane-end check (one sync at
the end). GB/s = raw KV bytes / median time (CUDA events). Also checks, per configuration,
that the device bytes equal the CPU reference's, and times decode/encode variants
(--variants: groups per program, word prefetch by gather on/off).

    python benchmarks/codec_speed.py [--levels lossless,int8,default,aggressive] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvtransfer.codec import KVEncoder, ModelFingerprint, bits_per_element  # noqa: E402
from kvtransfer.codec import gpu  # noqa: E402
from kvtransfer.codec.format import frame_section  # noqa: E402


def _time(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def _stages(h, kv: torch.Tensor) -> dict[str, float]:
    """Median ms of each encode/decode launch group of the default level (same inputs each time)."""
    from kernels.codec_quantize import Workspace, quantize_histogram, scale_stats
    from kernels.codec_rans import build_tables, rans_decode, rans_encode
    cfg = h.level
    nl, _, t, hh, d = kv.shape
    lo, hi = gpu._quant_range(h)
    gmax = max(gpu._group_layout(mode, hi - lo, hh, d)[0] for mode in (cfg.k_scale, cfg.v_scale))
    modes = gpu._MODES[cfg.k_scale], gpu._MODES[cfg.v_scale]
    ab = gpu._alpha_band(cfg, nl, range(nl), kv.device)
    out = {"workspace memset": _time(lambda: Workspace(2 * nl, gmax, hh, cfg.alphabet, kv.device), 5) * 1e3}
    ws = Workspace(2 * nl, gmax, hh, cfg.alphabet, kv.device)
    out["scale stats"] = _time(lambda: scale_stats(kv, lo, hi, *modes, ws), 5) * 1e3
    out["quantize+histogram"] = _time(lambda: quantize_histogram(kv, lo, hi, ab, *modes, cfg.max_q, ws), 5) * 1e3
    syms = quantize_histogram(kv, lo, hi, ab, *modes, cfg.max_q, ws)
    out["tables (encode)"] = _time(lambda: build_tables(ws.counts), 5) * 1e3
    tb = build_tables(ws.counts)
    out["rANS encode+compact"] = _time(lambda: rans_encode(syms, tb, hh, d, hh, cfg.lane_len), 5) * 1e3
    words, counts, _, states = rans_encode(syms, tb, hh, d, hh, cfg.lane_len)
    out["tables (decode, LUT)"] = _time(lambda: build_tables(tb.freq, from_counts=False, want_lut=True), 5) * 1e3
    dt = build_tables(tb.freq, from_counts=False, want_lut=True)
    out["rANS decode (syms)"] = _time(lambda: rans_decode(words, counts, states, dt, 2 * nl, syms.shape[1], hh, d, hh,
                                                          cfg.lane_len), 5) * 1e3
    return out


def kv_like(layers: int, t: int, heads: int, dim: int) -> torch.Tensor:
    """Random KV with per-channel magnitudes spread 40x (key-like outlier channels) and a sink token."""
    g = torch.Generator(device="cuda").manual_seed(0)
    kv = torch.randn(layers, 2, t, heads, dim, device="cuda", generator=g)
    kv[:, 0] *= torch.logspace(-1, 0.6, dim, device="cuda")[torch.randperm(dim, device="cuda", generator=g)]
    kv[:, :, 0] *= 8
    return kv.bfloat16()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="lossless,int8,default,aggressive")
    ap.add_argument("--chunks", default="256,2048")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--check-bytes", default="256:default,256:aggressive,256:int8,256:lossless,2048:default")
    ap.add_argument("--variants", action="store_true", help="also time default with other launch shapes")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    nl, hh, d = 32, 8, 128
    fp = ModelFingerprint(nl, hh, d, "bfloat16")
    rows = []
    dev = torch.cuda.get_device_name()
    checks = set(args.check_bytes.split(",")) if args.check_bytes else set()
    for t in (int(c) for c in args.chunks.split(",")):
        kv = kv_like(nl, t, hh, d)
        raw = kv.numel() * kv.element_size()
        copy_s = _time(lambda: kv.clone(), args.iters)
        rows.append({"level": "device copy", "chunk": t, "encode_GBps": raw / copy_s / 1e9,
                     "decode_GBps": raw / copy_s / 1e9, "bits_per_element": 16.0, "same_bytes": None})
        for level in args.levels.split(","):
            enc = KVEncoder(fp, level, token_start=0, num_tokens=t, seq_len=t)
            h = enc.h
            enc_s = _time(lambda: gpu.encode_device(h, kv), args.iters)
            de = gpu.encode_device(h, kv)
            dec_s = _time(lambda: gpu.decode_full(h, de, kv.dtype), args.iters)
            pay = gpu.payloads(h, kv, de)
            stream = enc.header() + b"".join(frame_section(p) for p in pay)
            same = None
            if f"{t}:{level}" in checks:
                t0 = time.time()
                ref = enc.header() + b"".join(enc.encode_layers([(i, kv[i, 0].cpu(), kv[i, 1].cpu()) for i in range(nl)]))
                same = ref == stream
                print(f"  reference bytes for {level}@{t}: {time.time() - t0:.1f}s, identical={same}", flush=True)
            rows.append({"level": level, "chunk": t, "encode_GBps": raw / enc_s / 1e9, "decode_GBps": raw / dec_s / 1e9,
                         "bits_per_element": bits_per_element(len(stream), nl, t, hh, d), "same_bytes": same})
            print(rows[-1], flush=True)
            bits = rows[-1]["bits_per_element"]
            if args.variants and level == "default":
                for stage, ms in _stages(h, kv).items():
                    print(f"  stage {stage:>22} @{t}: {ms:8.3f} ms", flush=True)
                    rows.append({"level": f"  stage {stage} (ms)", "chunk": t, "encode_GBps": ms,
                                 "decode_GBps": float("nan"), "bits_per_element": float("nan"), "same_bytes": None})
                for lane_len in (256, 512, 1024):
                    lv = dataclasses.replace(h.level, name=f"default-lane{lane_len}", lane_len=lane_len)
                    e2 = KVEncoder(fp, lv, token_start=0, num_tokens=t, seq_len=t)
                    e_s = _time(lambda: gpu.encode_device(e2.h, kv), args.iters)
                    de2 = gpu.encode_device(e2.h, kv)
                    d_s = _time(lambda: gpu.decode_full(e2.h, de2, kv.dtype), args.iters)
                    size = len(e2.header()) + sum(len(frame_section(p)) for p in gpu.payloads(e2.h, kv, de2))
                    rows.append({"level": lv.name, "chunk": t, "encode_GBps": raw / e_s / 1e9,
                                 "decode_GBps": raw / d_s / 1e9,
                                 "bits_per_element": bits_per_element(size, nl, t, hh, d), "same_bytes": None})
                    print(rows[-1], flush=True)
                for gpp in (1, 2, 4):  # launch shape: bytes do not depend on it
                    for gather in (True, False):
                        try:
                            d_s = _time(lambda: gpu.decode_full(h, de, kv.dtype, gather=gather, gpp=gpp), args.iters)
                            e_s = _time(lambda: gpu.encode_device(h, kv, gpp=gpp), args.iters) if gather else float("nan")
                        except Exception as exc:  # a variant that does not build is reported, not fatal
                            print(f"  variant gpp={gpp} gather={gather}: {type(exc).__name__} {exc}", flush=True)
                            continue
                        rows.append({"level": f"default gpp={gpp}{' gather' if gather else ''}", "chunk": t,
                                     "encode_GBps": raw / e_s / 1e9, "decode_GBps": raw / d_s / 1e9,
                                     "bits_per_element": bits, "same_bytes": None})
                        print(rows[-1], flush=True)
    print(f"\n{dev}, Llama-3-8B KV shape (32 x 8 x 128, bf16), torch {torch.__version__}")
    print(f"{'level':>22} {'chunk':>6} {'encode GB/s':>12} {'decode GB/s':>12} {'bits/el':>8} {'same bytes':>10}")
    for r in rows:
        print(f"{r['level']:>22} {r['chunk']:>6} {r['encode_GBps']:>12.1f} {r['decode_GBps']:>12.1f} "
              f"{r['bits_per_element']:>8.3f} {str(r['same_bytes']):>10}")
    if args.out:
        args.out.write_text(json.dumps({"device": dev, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
