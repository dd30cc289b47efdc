"""GPU speed of the KV codec: encode / decode GB/s of raw KV per level, next to device copy.

KV shaped like Llama-3-8B (32 layers x 8 KV heads x 128, bf16), one stream per token chunk
(256 and 2048 tokens), all layers in one call. Encode = scales + quantize + histogram + tables
+ rANS encode + compaction, ending in device buffers (no host copy, no msgpack framing). Decode
= tables + rANS decode fused with dequantize (quant levels) + the lane-end check (one sync at
the end). GB/s = raw KV bytes / median time (CUDA events). Also checks, per configuration,
that the device bytes equal the CPU reference's.

    --baselines   zstd on the raw bytes and the CacheGen-as-released-style level, same chunks (CPU)
    --channel L   the cluster's per-layer path for levels L: LayerPacker -> LayerUnpacker on the device
    --stages      ms per launch group of default (quantize+histogram both ways)
    --variants    stages, shorter lanes, launch shapes
    --cpu-smoke   tiny shapes on CPU under TRITON_INTERPRET=1 (tests run it; no speed meaning)

    python benchmarks/codec_speed.py --baselines --channel raw,default [--out FILE.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvtransfer.codec import KVDecoder, KVEncoder, ModelFingerprint, bits_per_element, level_names  # noqa: E402
from kvtransfer.codec import gpu  # noqa: E402
from kvtransfer.codec.format import frame_section  # noqa: E402
from kvtransfer.payload import LayerPacker, LayerUnpacker  # noqa: E402


def _time(fn, iters: int) -> float:
    """Median seconds of fn(): CUDA events on a GPU, wall clock on CPU (the smoke mode)."""
    fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
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


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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
    out["quantize+histogram (H*A-bin tiles)"] = _time(
        lambda: quantize_histogram(kv, lo, hi, ab, *modes, cfg.max_q, ws, per_head=False), 5) * 1e3
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


def kv_like(layers: int, t: int, heads: int, dim: int, device: str = "cuda") -> torch.Tensor:
    """Random KV with per-channel magnitudes spread 40x (key-like outlier channels) and a sink token."""
    g = torch.Generator(device=device).manual_seed(0)
    kv = torch.randn(layers, 2, t, heads, dim, device=device, generator=g)
    kv[:, 0] *= torch.logspace(-1, 0.6, dim, device=device)[torch.randperm(dim, device=device, generator=g)]
    kv[:, :, 0] *= 8
    return kv.bfloat16()


def _row(level: str, chunk: int, enc_gbps: float, dec_gbps: float, bits: float, same=None, where: str = "device",
         **extra) -> dict:
    return {"level": level, "chunk": chunk, "encode_GBps": enc_gbps, "decode_GBps": dec_gbps,
            "bits_per_element": bits, "same_bytes": same, "where": where, **extra}


def level_rows(fp: ModelFingerprint, kv: torch.Tensor, levels: list[str], iters: int, checks: set[str]) -> list[dict]:
    """Device encode (to device buffers) and fused decode of all layers in one call, per level."""
    nl, _, t, hh, d = kv.shape
    raw = kv.numel() * kv.element_size()
    rows = []
    for level in levels:
        enc = KVEncoder(fp, level, token_start=0, num_tokens=t, seq_len=t)
        h = enc.h
        enc_s = _time(lambda: gpu.encode_device(h, kv), iters)
        de = gpu.encode_device(h, kv)
        dec_s = _time(lambda: gpu.decode_full(h, de, kv.dtype), iters)
        stream = enc.header() + b"".join(frame_section(p) for p in gpu.payloads(h, kv, de))
        same = None
        if f"{t}:{level}" in checks:
            t0 = time.time()
            ref = enc.header() + b"".join(enc.encode_layers([(i, kv[i, 0].cpu(), kv[i, 1].cpu()) for i in range(nl)]))
            same = ref == stream
            print(f"  reference bytes for {level}@{t}: {time.time() - t0:.1f}s, identical={same}", flush=True)
        rows.append(_row(level, t, raw / enc_s / 1e9, raw / dec_s / 1e9,
                         bits_per_element(len(stream), nl, t, hh, d), same))
        print(rows[-1], flush=True)
    return rows


def baseline_rows(fp: ModelFingerprint, kv: torch.Tensor, cachegen_layers: int) -> list[dict]:
    """zstd (level 3, one core) on the raw bytes of all layers, and the CacheGen-as-released-style
    level (absmax per token over all heads, 32/16 bins, 16-bit CDF per channel per chunk) through
    the CPU reference on the first `cachegen_layers` layers (it has no device path)."""
    nl, _, t, hh, d = kv.shape
    host = kv.cpu()
    rows = []
    try:
        import zstandard
    except ImportError:
        print("  zstandard not installed: no zstd row", flush=True)
    else:
        data = host.view(torch.int16).numpy().tobytes()
        t0 = time.perf_counter()
        comp = zstandard.ZstdCompressor(level=3).compress(data)
        enc_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        zstandard.ZstdDecompressor().decompress(comp)
        dec_s = time.perf_counter() - t0
        rows.append(_row("zstd-3 (raw bytes)", t, len(data) / enc_s / 1e9, len(data) / dec_s / 1e9,
                         8 * len(comp) / host.numel(), where="cpu, 1 core"))
        print(rows[-1], flush=True)
    name = f"cachegen{t}" if f"cachegen{t}" in level_names() else "cachegen"
    nc = min(cachegen_layers, nl)
    sub = ModelFingerprint(nc, hh, d, fp.dtype)
    enc = KVEncoder(sub, name, token_start=0, num_tokens=t, seq_len=t)
    layers = [(i, host[i, 0], host[i, 1]) for i in range(nc)]
    t0 = time.perf_counter()
    secs = enc.encode_layers(layers)
    enc_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    KVDecoder(enc.header()).decode_layers_indexed(secs)
    dec_s = time.perf_counter() - t0
    raw = host[:nc].numel() * host.element_size()
    size = len(enc.header()) * nc / nl + sum(len(x) for x in secs)   # header shared by a whole stream
    rows.append(_row(f"{name} (CacheGen-style)", t, raw / enc_s / 1e9, raw / dec_s / 1e9,
                     bits_per_element(size, nc, t, hh, d), where=f"cpu reference, {nc} layers"))
    print(rows[-1], flush=True)
    return rows


def channel_rows(fp: ModelFingerprint, kv: torch.Tensor, levels: list[str], iters: int) -> list[dict]:
    """The cluster's per-layer path: LayerPacker.pack (encode on the device + bytes to the host)
    and LayerUnpacker.unpack on the same device (upload + device decode; raw: the received bytes
    copied to the device, as the decode worker does), median ms per layer over all layers."""
    nl, _, t, hh, d = kv.shape
    layer_bytes = 2 * t * hh * d * kv.element_size()
    dev = kv.device
    rows = []
    for level in levels:
        packer = LayerPacker(fp, level, t)
        unpacker = LayerUnpacker(fp, level, t, packer.stream_header(), device=dev)
        pack_s, unpack_s, bodies = [], [], []
        for rep in range(max(1, iters // 5) + 1):     # the first pass warms up (kernel builds)
            ps, us, bodies = [], [], []
            for i in range(nl):
                _sync()
                t0 = time.perf_counter()
                bodies.append(bytearray(packer.pack(i, kv[i, 0], kv[i, 1])))
                ps.append(time.perf_counter() - t0)
            for body in bodies:
                _sync()
                t0 = time.perf_counter()
                k, v = unpacker.unpack(body)
                k, v = k.to(dev, non_blocking=True), v.to(dev, non_blocking=True)
                _sync()
                us.append(time.perf_counter() - t0)
            if rep:
                pack_s += ps
                unpack_s += us
        p_ms, u_ms = statistics.median(pack_s) * 1e3, statistics.median(unpack_s) * 1e3
        wire = sum(len(b) for b in bodies) + len(packer.stream_header())
        rows.append(_row(f"channel {level}", t, layer_bytes / p_ms / 1e6, layer_bytes / u_ms / 1e6,
                         bits_per_element(wire, nl, t, hh, d), where=f"per layer: pack {p_ms:.3f} ms, "
                         f"unpack {u_ms:.3f} ms", pack_ms=p_ms, unpack_ms=u_ms))
        print(rows[-1], flush=True)
    return rows


def stage_rows(fp: ModelFingerprint, kv: torch.Tensor) -> list[dict]:
    """default: ms per encode/decode launch group (in the encode column)."""
    t = kv.shape[2]
    h = KVEncoder(fp, "default", token_start=0, num_tokens=t, seq_len=t).h
    rows = []
    for stage, ms in _stages(h, kv).items():
        print(f"  stage {stage:>22} @{t}: {ms:8.3f} ms", flush=True)
        rows.append(_row(f"stage {stage} (ms)", t, ms, float("nan"), float("nan")))
    return rows


def variant_rows(fp: ModelFingerprint, kv: torch.Tensor, iters: int) -> list[dict]:
    """default: shorter lanes, and decode/encode launch shapes."""
    nl, _, t, hh, d = kv.shape
    raw = kv.numel() * kv.element_size()
    h = KVEncoder(fp, "default", token_start=0, num_tokens=t, seq_len=t).h
    de = gpu.encode_device(h, kv)
    rows = []
    for lane_len in (256, 512, 1024):
        lv = dataclasses.replace(h.level, name=f"default-lane{lane_len}", lane_len=lane_len)
        e2 = KVEncoder(fp, lv, token_start=0, num_tokens=t, seq_len=t)
        e_s = _time(lambda: gpu.encode_device(e2.h, kv), iters)
        de2 = gpu.encode_device(e2.h, kv)
        d_s = _time(lambda: gpu.decode_full(e2.h, de2, kv.dtype), iters)
        size = len(e2.header()) + sum(len(frame_section(p)) for p in gpu.payloads(e2.h, kv, de2))
        rows.append(_row(lv.name, t, raw / e_s / 1e9, raw / d_s / 1e9, bits_per_element(size, nl, t, hh, d)))
        print(rows[-1], flush=True)
    for gpp in (1, 2, 4):  # launch shape: bytes do not depend on it
        for gather in (True, False):
            try:
                d_s = _time(lambda: gpu.decode_full(h, de, kv.dtype, gather=gather, gpp=gpp), iters)
                e_s = _time(lambda: gpu.encode_device(h, kv, gpp=gpp), iters) if gather else float("nan")
            except Exception as exc:  # a variant that does not build is reported, not fatal
                print(f"  variant gpp={gpp} gather={gather}: {type(exc).__name__} {exc}", flush=True)
                continue
            rows.append(_row(f"default gpp={gpp}{' gather' if gather else ''}", t, raw / e_s / 1e9,
                             raw / d_s / 1e9, float("nan")))
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="lossless,int8,default,aggressive")
    ap.add_argument("--chunks", default=None, help="token chunks (default 256,2048; 12,20 with --cpu-smoke)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--check-bytes", default="256:default,2048:default")
    ap.add_argument("--baselines", action="store_true", help="zstd and CacheGen-style rows (CPU)")
    ap.add_argument("--cachegen-layers", type=int, default=4, help="layers the CacheGen-style row codes")
    ap.add_argument("--channel", default="", help="levels to time through LayerPacker -> LayerUnpacker per layer")
    ap.add_argument("--stages", action="store_true", help="ms per launch group of default's encode/decode")
    ap.add_argument("--variants", action="store_true", help="also time default with other lanes and launch shapes")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shapes on the CPU (kernels under TRITON_INTERPRET=1): checks the script, not speed")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        nl, hh, d, where = 2, 2, 16, "cpu"
        chunks = [int(c) for c in (args.chunks or "12,20").split(",")]
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--cpu-smoke needs TRITON_INTERPRET=1 in the environment (set before Triton loads)")
    else:
        nl, hh, d, where = 32, 8, 128, "cuda"
        chunks = [int(c) for c in (args.chunks or "256,2048").split(",")]
    fp = ModelFingerprint(nl, hh, d, "bfloat16")
    dev = torch.cuda.get_device_name() if where == "cuda" else "CPU (TRITON_INTERPRET=1)"
    checks = set(args.check_bytes.split(",")) if args.check_bytes else set()
    if args.cpu_smoke:
        checks = {f"{t}:{lv}" for t in chunks for lv in args.levels.split(",")}
    rows = []
    decodes_on = gpu.decodes_on
    if args.cpu_smoke:   # the channel rows' decoders run the interpreted kernels, as on a GPU
        gpu.decodes_on = lambda device: True
    try:
        for t in chunks:
            kv = kv_like(nl, t, hh, d, where)
            raw = kv.numel() * kv.element_size()
            copy_s = _time(lambda: kv.clone(), args.iters)
            rows.append(_row("device copy (clone)", t, raw / copy_s / 1e9, raw / copy_s / 1e9, 16.0))
            rows += level_rows(fp, kv, args.levels.split(","), args.iters, checks)
            if args.baselines:
                rows += baseline_rows(fp, kv, args.cachegen_layers)
            if args.channel:
                rows += channel_rows(fp, kv, args.channel.split(","), args.iters)
            if args.stages or args.variants:
                rows += stage_rows(fp, kv)
            if args.variants:
                rows += variant_rows(fp, kv, args.iters)
    finally:
        gpu.decodes_on = decodes_on
    print(f"\n{dev}, KV {nl} layers x {hh} kv heads x {d}, bf16, torch {torch.__version__}")
    print("GB/s of raw KV (2 bytes/element); channel rows: GB/s per layer through pack / unpack")
    print(f"{'level':>26} {'chunk':>6} {'encode GB/s':>12} {'decode GB/s':>12} {'bits/el':>8} {'same bytes':>10}  where")
    for r in rows:
        print(f"{r['level']:>26} {r['chunk']:>6} {r['encode_GBps']:>12.2f} {r['decode_GBps']:>12.2f} "
              f"{r['bits_per_element']:>8.3f} {str(r['same_bytes']):>10}  {r['where']}")
    if args.out:
        args.out.write_text(json.dumps({"device": dev, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
