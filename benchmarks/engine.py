"""Engine speed on one GPU: decode steps against the HBM floor, prefill against the matmul
rate, with transformers' own Llama alongside, all measured in one run.

    python -m benchmarks.engine [--model llama-3-8b] [--out FILE.json] [--no-hf]
    python -m benchmarks.engine --cpu-smollm2          # CPU tokens/s, real SmolLM2 weights

1. Ceilings, measured here: device copy (bytes read + written, 1 GiB) and bf16 8192^3 matmul.
2. Ours (dummy weights, bf16, Triton ops, CUDA-graph decode): a step is `ModelRunner.execute`,
   wall clock, host preparation and sampling included (it returns tokens, so it syncs).
   Decode floor = (weights read + KV read) / copy rate; weights read = every parameter but the
   embedding table (only one row per token is read). KV pages are random, the cache random.
   Prefill % = (2 x tokens x linear params + causal attention FLOPs + lm_head on the sampled
   rows) / time / matmul rate.
3. transformers: LlamaForCausalLM from a LlamaConfig of the same shape, random bf16 weights, sdpa;
   decode with its StaticCache filled with random KV (max_cache_len = context), prefill with
   logits_to_keep=1; a step is forward + argmax + .tolist().
The position table is extended to cover the longest context (16K > Llama-3-8B's 8K); the shapes
and so the bytes and FLOPs are Llama-3-8B's.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig
from engine.cuda_graphs import batch_bucket, width_bucket
from engine.model_runner import ModelRunner
from engine.presets import get_preset
from engine.request import Request, SamplingParams
from engine.scheduler import ScheduledBatch, ScheduledSeq

DECODE_CASES = [(1, 1024), (64, 1024), (1, 4096), (64, 4096), (1, 16384), (16, 16384)]
PREFILL_CASES = [[512], [2048], [4096], [512] * 8]
BLOCK_SIZE = 16


def sync_wall(fn: Callable[[], Any], iters: int, warmup: int) -> float:
    """Median wall-clock ms of fn() with the device synchronized around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def event_ms(fn: Callable[[], Any], iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def measure_ceilings() -> dict[str, float]:
    from triton.testing import do_bench
    src = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)     # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=200, rep=1000, return_mode="median")
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = do_bench(lambda: a @ b, warmup=500, rep=1000, return_mode="median")
    del a, b
    torch.cuda.empty_cache()
    return {"copy_gbps": 2 * (1 << 30) / copy_ms / 1e6, "matmul_tflops": 2 * 8192 ** 3 / mm_ms / 1e9}


# ---- FLOP and byte counts -------------------------------------------------------------------

def linear_params_per_layer(c: ModelConfig) -> int:
    return c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * c.hidden_size * c.intermediate_size


def prefill_flops(c: ModelConfig, lens: list[int]) -> float:
    linear = 2 * sum(lens) * linear_params_per_layer(c) * c.num_layers
    attn = c.num_layers * 4 * c.num_heads * c.head_dim * sum(n * (n + 1) / 2 for n in lens)
    return linear + attn + 2 * len(lens) * c.hidden_size * c.vocab_size


def decode_floor_bytes(c: ModelConfig, batch: int, ctx: int, weight_bytes: int) -> float:
    return weight_bytes + batch * ctx * c.kv_bytes_per_token(torch.bfloat16)


# ---- ours -----------------------------------------------------------------------------------

class Pages:
    """Random pages for synthetic requests (a shuffled free list, as after hours of serving)."""

    def __init__(self, num_blocks: int) -> None:
        self.blocks = BlockManager(num_blocks, BLOCK_SIZE)
        gen = torch.Generator().manual_seed(0)
        self.blocks._free = type(self.blocks._free)(torch.randperm(num_blocks, generator=gen).tolist())

    def request(self, num_tokens: int, ctx_tokens: int, vocab: int) -> Request:
        gen = torch.Generator().manual_seed(num_tokens)
        req = Request(f"r{id(gen)}", torch.randint(0, vocab, (num_tokens,), generator=gen).tolist(),
                      SamplingParams(max_tokens=1 << 20, ignore_eos=True), 0.0)
        req.block_table = self.blocks.allocate(self.blocks.blocks_for(ctx_tokens))
        return req

    def release(self, batch: ScheduledBatch) -> None:
        for s in batch.seqs:
            self.blocks.free(s.request.block_table)


def profile_step(fn: Callable[[], Any], title: str) -> str:
    """The top CUDA kernels of one call of fn (after a warm-up), as a text table."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    return f"==== {title}\n{table}\n"


def bench_ours(cfg: ModelConfig, ceilings: dict[str, float], quick: bool,
               profile_path: str | None = None) -> dict[str, Any]:
    kv_tokens = max(b * c for b, c in DECODE_CASES)
    num_blocks = kv_tokens // BLOCK_SIZE + 64
    ecfg = EngineConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks, max_num_seqs=64, device="cuda",
                        dtype=torch.bfloat16, max_num_batched_tokens=8192)
    runner = ModelRunner(cfg, ecfg)
    for layer in runner.kv_cache.kv:           # never time on zeros
        layer.normal_()
    weight_bytes = sum(p.numel() * p.element_size() for n, p in runner.model.named_parameters()
                       if "embed_tokens" not in n or cfg.tie_word_embeddings)
    pages = Pages(num_blocks)
    out: dict[str, Any] = {"weight_bytes": weight_bytes, "decode": [], "prefill": []}
    iters = 5 if quick else 20
    profiles: list[str] = []
    for batch_size, ctx in DECODE_CASES:
        batch = ScheduledBatch(decodes=[ScheduledSeq(pages.request(ctx, ctx, cfg.vocab_size), 1, ctx - 1)
                                        for _ in range(batch_size)])
        assert runner.uses_graph(batch)
        ms = sync_wall(lambda: runner.execute(batch), iters, warmup=3)
        graph = runner.graphs._graphs[(batch_bucket(batch_size), width_bucket(-(-ctx // BLOCK_SIZE)))][0]
        gpu_ms = event_ms(graph.replay, iters)
        inputs = runner.decode_graph_inputs(batch)
        host_ms = sync_wall(lambda: runner.graphs.stage(*inputs), iters, warmup=1)
        floor_ms = decode_floor_bytes(cfg, batch_size, ctx, weight_bytes) / ceilings["copy_gbps"] / 1e6
        out["decode"].append({"batch": batch_size, "ctx": ctx, "ms": ms, "gpu_ms": gpu_ms, "stage_ms": host_ms,
                              "floor_ms": floor_ms, "ratio": ms / floor_ms, "gpu_ratio": gpu_ms / floor_ms})
        print(f"ours decode b={batch_size} ctx={ctx}: {ms:.2f} ms (graph {gpu_ms:.2f}, stage {host_ms:.3f}), "
              f"floor {floor_ms:.2f}", flush=True)
        if profile_path and ctx == 1024:
            profiles.append(profile_step(lambda: runner.execute(batch), f"decode b={batch_size} ctx={ctx}"))
        pages.release(batch)
    for lens in PREFILL_CASES:
        batch = ScheduledBatch(prefills=[ScheduledSeq(pages.request(n, n, cfg.vocab_size), n, 0) for n in lens])
        ms = sync_wall(lambda: runner.execute(batch), 3 if quick else 10, warmup=2)
        pct = prefill_flops(cfg, lens) / (ms * 1e-3) / 1e12 / ceilings["matmul_tflops"] * 100
        out["prefill"].append({"lens": lens, "ms": ms, "pct_matmul": pct})
        print(f"ours prefill {len(lens)}x{lens[0]}: {ms:.2f} ms, {pct:.0f}% of matmul", flush=True)
        if profile_path and lens in ([4096], [512]):
            profiles.append(profile_step(lambda: runner.execute(batch), f"prefill {lens}"))
        pages.release(batch)
    if profile_path:
        with open(profile_path, "w") as f:
            f.writelines(profiles)
    out["graphs_captured"] = runner.graphs.captured
    del runner
    gc.collect()
    torch.cuda.empty_cache()
    return out


# ---- transformers ---------------------------------------------------------------------------

def hf_model(cfg: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                         head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                         max_position_embeddings=cfg.max_position_embeddings,
                         tie_word_embeddings=cfg.tie_word_embeddings)
    hf_cfg._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(hf_cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval(), hf_cfg


@torch.inference_mode()
def bench_hf(cfg: ModelConfig, ceilings: dict[str, float], weight_bytes: int, quick: bool) -> dict[str, Any]:
    from transformers import StaticCache
    model, hf_cfg = hf_model(cfg)
    out: dict[str, Any] = {"decode": [], "prefill": []}
    iters = 3 if quick else 10
    for batch_size, ctx in DECODE_CASES:
        try:
            cache = StaticCache(config=hf_cfg, max_cache_len=ctx)
            ids = torch.randint(0, cfg.vocab_size, (batch_size, 1), device="cuda")
            model(input_ids=ids, past_key_values=cache, cache_position=torch.tensor([0], device="cuda"),
                  use_cache=True)                                       # sizes the cache
            for layer in cache.layers:
                layer.keys.normal_()
                layer.values.normal_()
            pos = torch.full((batch_size, 1), ctx - 1, device="cuda")
            cache_pos = torch.tensor([ctx - 1], device="cuda")

            def step():
                logits = model(input_ids=ids, past_key_values=cache, position_ids=pos, cache_position=cache_pos,
                               use_cache=True).logits
                return logits[:, -1].argmax(-1).tolist()

            ms = sync_wall(step, iters, warmup=2)
            floor_ms = decode_floor_bytes(cfg, batch_size, ctx, weight_bytes) / ceilings["copy_gbps"] / 1e6
            out["decode"].append({"batch": batch_size, "ctx": ctx, "ms": ms, "floor_ms": floor_ms,
                                  "ratio": ms / floor_ms})
            print(f"hf decode b={batch_size} ctx={ctx}: {ms:.2f} ms", flush=True)
        except Exception as exc:  # report and go on: one failed case must not lose the run
            out["decode"].append({"batch": batch_size, "ctx": ctx, "error": repr(exc)[:300]})
            print(f"hf decode b={batch_size} ctx={ctx} failed: {exc!r}"[:400], flush=True)
        cache = None
        gc.collect()
        torch.cuda.empty_cache()
    for lens in PREFILL_CASES:
        try:
            ids = torch.randint(0, cfg.vocab_size, (len(lens), lens[0]), device="cuda")

            def prefill():
                logits = model(input_ids=ids, use_cache=True, logits_to_keep=1).logits
                return logits[:, -1].argmax(-1).tolist()

            ms = sync_wall(prefill, iters, warmup=2)
            pct = prefill_flops(cfg, lens) / (ms * 1e-3) / 1e12 / ceilings["matmul_tflops"] * 100
            out["prefill"].append({"lens": lens, "ms": ms, "pct_matmul": pct})
            print(f"hf prefill {len(lens)}x{lens[0]}: {ms:.2f} ms, {pct:.0f}%", flush=True)
        except Exception as exc:
            out["prefill"].append({"lens": lens, "error": repr(exc)[:300]})
            print(f"hf prefill {lens[:1]}x{len(lens)} failed: {exc!r}"[:400], flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


# ---- report ---------------------------------------------------------------------------------

def table(result: dict[str, Any]) -> str:
    c = result["ceilings"]
    lines = [f"{result['device']}  torch {result['torch']}  copy {c['copy_gbps']:.0f} GB/s  "
             f"matmul {c['matmul_tflops']:.0f} TFLOP/s  model {result['model']} bf16",
             "", "decode step     ours ms  (graph)  floor ms  ratio (graph) |   hf ms  ratio",
             "-" * 76]
    hf = {(d["batch"], d["ctx"]): d for d in result.get("hf", {}).get("decode", [])}
    for d in result["ours"]["decode"]:
        h = hf.get((d["batch"], d["ctx"]), {})
        hf_s = f"{h['ms']:7.2f} {h['ratio']:6.2f}x" if "ms" in h else "      -       -"
        lines.append(f"b={d['batch']:<3} ctx={d['ctx'] // 1024:>2}K  {d['ms']:8.2f} {d['gpu_ms']:8.2f} "
                     f"{d['floor_ms']:9.2f} {d['ratio']:5.2f}x {d['gpu_ratio']:6.2f}x | {hf_s}")
    lines += ["", "prefill         ours ms  % matmul |   hf ms  % matmul", "-" * 52]
    hfp = {tuple(p["lens"]): p for p in result.get("hf", {}).get("prefill", [])}
    for p in result["ours"]["prefill"]:
        h = hfp.get(tuple(p["lens"]), {})
        hf_s = f"{h['ms']:7.2f} {h['pct_matmul']:8.0f}%" if "ms" in h else "      -        -"
        name = f"{len(p['lens'])}x{p['lens'][0]}" if len(p["lens"]) > 1 else f"{p['lens'][0]}"
        lines.append(f"{name:<14} {p['ms']:8.2f} {p['pct_matmul']:8.0f}% | {hf_s}")
    return "\n".join(lines)


def cpu_smollm2(num_prompts: int = 16, max_tokens: int = 64) -> dict[str, Any]:
    """Output tokens/s of the colocated engine on CPU with the real SmolLM2 weights."""
    from benchmarks.workloads import load_workload
    from engine.engine import LLMEngine
    from engine.weights import ModelSource
    engine = LLMEngine.from_source(ModelSource("smollm2-135m"), EngineConfig(num_blocks=1024, max_num_seqs=64))
    prompts = [it.prompt for it in load_workload("sharegpt", num_prompts, engine.tokenizer, max_prompt_tokens=256)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    engine.generate(prompts[:2], SamplingParams(max_tokens=4))   # warm-up
    t0 = time.perf_counter()
    reqs = engine.generate(prompts, params)
    wall = time.perf_counter() - t0
    n_out = sum(len(r.output_token_ids) for r in reqs)
    n_in = sum(r.num_prompt_tokens for r in reqs)
    res = {"prompts": num_prompts, "prompt_tokens": n_in, "output_tokens": n_out, "wall_s": wall,
           "output_tokens_per_s": n_out / wall, "threads": torch.get_num_threads()}
    print(json.dumps(res))
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Engine speed on one GPU vs the HBM floor and the matmul rate, with transformers alongside.")
    ap.add_argument("--model", default="llama-3-8b", help="preset name (dummy weights)")
    ap.add_argument("--out", help="write all numbers here as JSON")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' numbers")
    ap.add_argument("--quick", action="store_true", help="fewer iterations (smoke test)")
    ap.add_argument("--profile", help="write the top kernels of a few steps here")
    ap.add_argument("--cpu-smollm2", action="store_true", help="CPU tokens/s with the real SmolLM2 weights")
    args = ap.parse_args(argv)
    if args.cpu_smollm2:
        res = cpu_smollm2()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
        return
    if not torch.cuda.is_available():
        sys.exit("benchmarks.engine needs a CUDA GPU (or --cpu-smollm2)")
    longest = max(c for _, c in DECODE_CASES)
    cfg = get_preset(args.model)
    cfg = dataclasses.replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings, longest + 64))
    ceilings = measure_ceilings()
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "model": args.model, "ceilings": ceilings, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(ceilings), flush=True)
    result["ours"] = bench_ours(cfg, ceilings, args.quick, args.profile)
    if args.out:   # keep what we have if transformers' part dies
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if not args.no_hf:
        result["hf"] = bench_hf(cfg, ceilings, result["ours"]["weight_bytes"], args.quick)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(table(result))


if __name__ == "__main__":
    main()
