"""Kernel benchmark: `python -m benchmarks.kernels [--out result.json] [--sweep]` (needs CUDA).

Measures, in one run on one card:
  1. the two ceilings: device-to-device copy bandwidth (bytes read + written) and the bf16
     8192^3 matmul rate;
  2. paged decode attention, Llama-3-8B layer shapes (32 q heads, 8 kv heads, head_dim 128,
     block 16), batch 1/64 x context 1K/4K/16K/32K: GB/s of KV + q + out bytes and % of copy;
  3. store_kv and gather/scatter_kv_blocks GB/s (read + write);
  4. prefill attention TFLOP/s (causal FLOPs actually needed) for 1x4096, 8x512 and a 512-token
     chunk after a 3584-token cached prefix: the Triton paged kernel vs torch SDPA on K/V
     gathered from the pages (gather included) and SDPA on already-dense K/V (a ceiling).
Inputs are random; each timed call rotates over enough distinct pages that the working set is
far larger than L2. Decode is timed as CUDA-graph replays (an engine step is graph-captured) and
eagerly. A short table is printed last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time

import torch
import triton
from triton.testing import do_bench

from kernels.kv_blocks import gather_kv_blocks, scatter_kv_blocks
from kernels.kv_store import store_kv
from kernels.paged_decode_attention import paged_decode_attention
from kernels.prefill_attention import prefill_attention

DT = torch.bfloat16
HQ, HKV, D, BS = 32, 8, 128, 16          # Llama-3-8B attention, block 16
ROTATE_BYTES = 512 << 20                  # working set per measurement, >> 50-60 MB of L2


def bench(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds."""
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def copy_bandwidth() -> float:
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * n / ms / 1e6  # GB/s


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, dtype=DT, device="cuda")
    b = torch.randn(8192, 8192, dtype=DT, device="cuda")
    ms = bench(lambda: a @ b, warmup=500, rep=500)  # long warm-up: clocks ramp from idle
    return 2 * 8192**3 / ms / 1e9


def graph_ms(calls, reps: int = 20) -> float:
    """Milliseconds per call when `calls` (a list of closures) are replayed from one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls[:3]:
            c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2] / len(calls)


def decode_case(batch: int, ctx: int, **kw) -> dict:
    kv_bytes = batch * ctx * HKV * D * 2 * 2
    io_bytes = 2 * batch * HQ * D * 2                       # q in, out
    pages = batch * (ctx // BS)
    num_sets = max(1, math.ceil(ROTATE_BYTES / kv_bytes))
    k_cache = torch.randn(num_sets * pages, BS, HKV, D, dtype=DT, device="cuda")
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_sets * pages, device="cuda").int()
    tables = [perm[i * pages : (i + 1) * pages].view(batch, ctx // BS).contiguous() for i in range(num_sets)]
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    qs = [torch.randn(batch, HQ, D, dtype=DT, device="cuda") for _ in range(num_sets)]
    calls = [lambda i=i: paged_decode_attention(qs[i], k_cache, v_cache, tables[i], lens, D**-0.5, **kw)
             for i in range(num_sets)]
    g_ms = graph_ms(calls)
    rotation = itertools.cycle(calls)
    e_ms = bench(lambda: next(rotation)())
    return {"batch": batch, "context": ctx, "bytes": kv_bytes + io_bytes, "graph_ms": g_ms,
            "eager_ms": e_ms, "graph_GBps": (kv_bytes + io_bytes) / g_ms / 1e6,
            "eager_GBps": (kv_bytes + io_bytes) / e_ms / 1e6, "config": {k: v for k, v in kw.items()}}


def store_case(num_tokens: int = 16384, **kw) -> dict:
    k = torch.randn(num_tokens, HKV, D, dtype=DT, device="cuda")
    v = torch.randn_like(k)
    num_blocks = 4 * num_tokens // BS
    kc = torch.empty(num_blocks, BS, HKV, D, dtype=DT, device="cuda")
    vc = torch.empty_like(kc)
    slots = torch.randperm(num_blocks * BS, device="cuda")[:num_tokens]
    ms = bench(lambda: store_kv(k, v, kc, vc, slots, **kw))
    nbytes = 2 * 2 * k.numel() * 2
    return {"num_tokens": num_tokens, "ms": ms, "GBps": nbytes / ms / 1e6, "config": dict(kw)}


def blocks_case(num_tokens: int = 32768) -> dict:
    pages = num_tokens // BS
    kc = torch.randn(4 * pages, BS, HKV, D, dtype=DT, device="cuda")
    vc = torch.randn_like(kc)
    ids = torch.randperm(4 * pages, device="cuda")[:pages].int()
    nbytes = 2 * 2 * num_tokens * HKV * D * 2
    g_ms = bench(lambda: gather_kv_blocks(kc, vc, ids, num_tokens))
    k, v = gather_kv_blocks(kc, vc, ids, num_tokens)
    s_ms = bench(lambda: scatter_kv_blocks(k, v, kc, vc, ids))
    return {"num_tokens": num_tokens, "gather_ms": g_ms, "gather_GBps": nbytes / g_ms / 1e6,
            "scatter_ms": s_ms, "scatter_GBps": nbytes / s_ms / 1e6}


def _causal_flops(q_len: int, ctx: int) -> float:
    keys = sum(ctx - q_len + j + 1 for j in range(q_len))   # keys seen by each query
    return 4.0 * HQ * D * keys


def _sdpa_paged(q, k_cache, v_cache, tables, qsl, lens, scale):
    """torch alternative: gather each sequence's pages, then SDPA (flash) per sequence with a
    bottom-right causal mask when the query is shorter than the context."""
    from torch.nn.attention.bias import causal_lower_right

    out = torch.empty_like(q)
    starts, ctxs = qsl.tolist(), lens.tolist()
    for i, ctx in enumerate(ctxs):
        m = starts[i + 1] - starts[i]
        k, v = gather_kv_blocks(k_cache, v_cache, tables[i, : ctx // BS], ctx)
        qi = q[starts[i] : starts[i + 1]].transpose(0, 1)[None]
        kt, vt = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        if m == ctx:
            o = torch.nn.functional.scaled_dot_product_attention(qi, kt, vt, is_causal=True, scale=scale,
                                                                 enable_gqa=True)
        else:
            o = torch.nn.functional.scaled_dot_product_attention(qi, kt, vt, attn_mask=causal_lower_right(m, ctx),
                                                                 scale=scale, enable_gqa=True)
        out[starts[i] : starts[i + 1]] = o[0].transpose(0, 1)
    return out


def prefill_case(name: str, shapes: list[tuple[int, int]], **kw) -> dict:
    ctxs = [c for _, c in shapes]
    pages = sum(c // BS for c in ctxs)
    kc = torch.randn(pages, BS, HKV, D, dtype=DT, device="cuda")
    vc = torch.randn_like(kc)
    perm = torch.randperm(pages, device="cuda").int()
    width = max(ctxs) // BS
    tables = torch.zeros(len(shapes), width, dtype=torch.int32, device="cuda")
    at = 0
    for i, c in enumerate(ctxs):
        tables[i, : c // BS] = perm[at : at + c // BS]
        at += c // BS
    qlens = [m for m, _ in shapes]
    qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    lens = torch.tensor(ctxs, dtype=torch.int32, device="cuda")
    q = torch.randn(sum(qlens), HQ, D, dtype=DT, device="cuda")
    scale = D**-0.5
    flops = sum(_causal_flops(m, c) for m, c in shapes)
    res = {"name": name, "flops": flops}
    t_ms = bench(lambda: prefill_attention(q, kc, vc, tables, qsl, lens, scale, max(qlens), **kw))
    res["triton_ms"], res["triton_TFLOPs"] = t_ms, flops / t_ms / 1e9
    res["config"] = dict(kw)
    want = _sdpa_paged(q, kc, vc, tables, qsl, lens, scale)
    got = prefill_attention(q, kc, vc, tables, qsl, lens, scale, max(qlens), **kw)
    res["max_abs_diff_vs_sdpa"] = (got.float() - want.float()).abs().max().item()
    try:
        s_ms = bench(lambda: _sdpa_paged(q, kc, vc, tables, qsl, lens, scale))
        res["sdpa_gather_ms"], res["sdpa_gather_TFLOPs"] = s_ms, flops / s_ms / 1e9
    except Exception as e:  # noqa: BLE001 - record why the alternative could not run
        res["sdpa_gather_error"] = repr(e)[:200]
    if all(m == c for m, c in shapes) and len(set(qlens)) == 1:
        # equal-length fresh prompts: batched SDPA on dense K/V is the ceiling for any paged path
        b, m = len(shapes), qlens[0]
        qd = q.view(b, m, HQ, D).transpose(1, 2)
        kd = torch.randn(b, HKV, m, D, dtype=DT, device="cuda")
        vd = torch.randn_like(kd)
        d_ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            qd, kd, vd, is_causal=True, scale=scale, enable_gqa=True))
        res["sdpa_dense_ms"], res["sdpa_dense_TFLOPs"] = d_ms, flops / d_ms / 1e9
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write all results as JSON here")
    ap.add_argument("--sweep", action="store_true", help="also time launch-config variants")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "benchmarks.kernels needs a CUDA GPU"
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    result: dict = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
                    "triton": triton.__version__, "date": time.strftime("%Y-%m-%d")}
    result["copy_GBps"] = copy_bandwidth()
    result["matmul_TFLOPs"] = matmul_tflops()
    print(f"{props.name}: copy {result['copy_GBps']:.0f} GB/s, bf16 matmul {result['matmul_TFLOPs']:.0f} TFLOP/s",
          flush=True)

    result["decode"] = []
    for batch in (1, 64):
        for ctx in (1024, 4096, 16384, 32768):
            r = decode_case(batch, ctx)
            result["decode"].append(r)
            print(f"decode b={batch} ctx={ctx}: {r['graph_GBps']:.0f} GB/s graph, {r['eager_GBps']:.0f} eager",
                  flush=True)
    if args.sweep:
        result["decode_sweep"] = []
        for batch, ctx in ((64, 4096), (1, 4096), (1, 32768)):
            for kw in ({"block_n": 64, "num_warps": 8}, {"block_n": 128}, {"block_n": 128, "num_warps": 8},
                       {"block_n": 32, "partition_size": 128}, {"block_n": 32, "num_warps": 2},
                       {"num_stages": 3}):
                try:
                    r = decode_case(batch, ctx, **kw)
                except Exception as e:  # noqa: BLE001
                    r = {"batch": batch, "context": ctx, "config": kw, "error": repr(e)[:200]}
                result["decode_sweep"].append(r)
                print(f"sweep decode b={batch} ctx={ctx} {kw}: {r.get('graph_GBps', float('nan')):.0f} GB/s",
                      flush=True)

    result["store_kv"] = store_case()
    if args.sweep:
        result["store_kv_sweep"] = [store_case(tokens_per_program=t) for t in (1, 2, 8, 16)]
        for r in result["store_kv_sweep"]:
            print(f"sweep store_kv {r['config']}: {r['GBps']:.0f} GB/s", flush=True)
    result["kv_blocks"] = blocks_case()
    prefill_cases = [("1x4096", [(4096, 4096)]), ("8x512", [(512, 512)] * 8),
                     ("chunk512+3584", [(512, 4096)])]
    result["prefill"] = [prefill_case(n, s) for n, s in prefill_cases]
    if args.sweep:
        result["prefill_sweep"] = []
        for n, s in prefill_cases[:2]:
            for kw in ({"block_m": 128, "block_n": 128}, {"block_m": 64, "block_n": 64},
                       {"block_m": 128, "block_n": 128, "num_stages": 2}, {"block_m": 128, "block_n": 128, "num_stages": 4},
                       {"block_m": 64, "block_n": 64, "num_stages": 4}, {"block_m": 128, "block_n": 64},
                       {"block_m": 64, "block_n": 32, "num_warps": 4}):
                try:
                    r = prefill_case(n, s, **kw)
                except Exception as e:  # noqa: BLE001
                    r = {"name": n, "config": kw, "error": repr(e)[:200]}
                result["prefill_sweep"].append(r)
                print(f"sweep prefill {n} {kw}: {r.get('triton_TFLOPs', float('nan')):.0f} TFLOP/s", flush=True)

    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    copy = result["copy_GBps"]
    print(f"\n== {result['device']} | torch {result['torch']} triton {result['triton']} | "
          f"copy {copy:.0f} GB/s | bf16 matmul {result['matmul_TFLOPs']:.0f} TFLOP/s ==")
    print("paged decode attention (Llama-3-8B layer: 32q/8kv/128, block 16, bf16)")
    print(f"{'batch':>5} {'context':>7} {'us(graph)':>9} {'GB/s':>6} {'%copy':>6} {'us(eager)':>9} {'%copy':>6}")
    for r in result["decode"]:
        print(f"{r['batch']:>5} {r['context']:>7} {r['graph_ms'] * 1e3:>9.1f} {r['graph_GBps']:>6.0f} "
              f"{100 * r['graph_GBps'] / copy:>5.0f}% {r['eager_ms'] * 1e3:>9.1f} {100 * r['eager_GBps'] / copy:>5.0f}%")
    s, b = result["store_kv"], result["kv_blocks"]
    print(f"store_kv {s['num_tokens']} tok: {s['GBps']:.0f} GB/s ({100 * s['GBps'] / copy:.0f}%) | "
          f"gather {b['gather_GBps']:.0f} GB/s ({100 * b['gather_GBps'] / copy:.0f}%) | "
          f"scatter {b['scatter_GBps']:.0f} GB/s ({100 * b['scatter_GBps'] / copy:.0f}%)")
    print("prefill attention TFLOP/s (causal FLOPs): triton-paged | sdpa+gather | sdpa-dense")
    for r in result["prefill"]:
        print(f"  {r['name']:>14}: {r['triton_TFLOPs']:6.0f} | {r.get('sdpa_gather_TFLOPs', float('nan')):6.0f} | "
              f"{r.get('sdpa_dense_TFLOPs', float('nan')):6.0f}   (max|diff| vs sdpa {r['max_abs_diff_vs_sdpa']:.2e})")


if __name__ == "__main__":
    main()
