"""KV transfer time between a prefill instance of TP p and a decode instance of TP d.

    python -m benchmarks.reshard_gpu --pairs 1:1,2:1,1:2,2:2,4:2 --tokens 2048,8192 [--levels raw,default]

One process per rank, as in the cluster: each prefill rank holds its KV heads of one request
in a paged cache on its GPU and streams every layer through its `KVStreamer` (the `ReshardPlan`
decides which heads go to which decode rank); each decode rank runs a `KVReceiver` into host
staging and, once its frames are complete, scatters them into its own paged cache, as decode
admission does. Time = from the prefill ranks starting to send until the last decode rank has
its heads in GPU memory. All layers are sent back to back (no prefill compute to overlap with),
so this is the transfer's full cost, not the part a request sees after its prefill.

Ranks are placed round-robin on the GPUs present (prefill from GPU 0 up, decode from the last
GPU down); a pair needing more GPUs than the machine has shares GPUs, which the host-staged
TCP path barely notices (the copies to and from the GPUs are the only device work).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from typing import Any

REPEATS = 5


def _own_gpu(device: str) -> str:
    """Each rank process sees only its GPU, as Ray arranges it for the cluster's actors (so its
    threads, e.g. the KV sender, all run on the current device)."""
    if device.startswith("cuda:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":")[1]
        return "cuda"
    return device


def _spec(model: str, num_tokens: int, num_heads: int, device: str) -> Any:
    import torch

    from engine.kv_cache import KVCacheSpec
    from engine.presets import get_preset
    cfg = get_preset(model)
    block = 16
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return cfg, KVCacheSpec(cfg.num_layers, num_heads, cfg.head_dim, block, -(-num_tokens // block) + 1, dtype)


def _sent_sum(kv: Any, num_tokens: int) -> float:
    """Sum of the request's KV (its first num_tokens slots), to check that the transfer moved it all."""
    return kv.flatten(2, 3)[:, :, :num_tokens].double().sum().item()


def decode_rank(rank: int, d: int, model: str, num_tokens: int, device: str, addr_q: Any, result_q: Any) -> None:
    import torch

    from decode_worker.worker import scatter_heads
    from engine.kv_cache import KVCache
    from engine.tensor_parallel import kv_heads_of
    from kvtransfer.receiver import KVReceiver
    from kvtransfer.staging import StagingArea

    device = _own_gpu(device)
    cfg, _ = _spec(model, num_tokens, 1, device)
    heads = kv_heads_of(rank, d, cfg.num_kv_heads)
    _, spec = _spec(model, num_tokens, heads[1] - heads[0], device)
    cache = KVCache(spec, device)
    blocks = torch.arange(spec.num_blocks - 1, device=device)

    def landed(staged: Any) -> None:   # a channel thread: the request's frames are all here
        try:
            for frame in staged.frames:
                scatter_heads(cache, frame, blocks)
            if cache.kv.is_cuda:
                torch.cuda.synchronize()
        except Exception as exc:   # noqa: BLE001 - reported to the parent, which stops
            result_q.put(("failed", rank, staged.request_id, 0.0, f"decode rank {rank}: {exc!r}"))
            return
        result_q.put(("landed", rank, staged.request_id, time.time(), _sent_sum(cache.kv, num_tokens)))
        staging.pop(staged.request_id)
        if staged.reply is not None:
            staged.reply(True, None)

    staging = StagingArea(control=rank == 0, on_complete=landed)
    receiver = KVReceiver(staging, heads, cfg.head_dim, "bfloat16" if cache.kv.is_cuda else "float32",
                          device=cache.kv.device)   # as a decode worker: coded layers decode on its GPU
    addr_q.put((rank, receiver.address))
    time.sleep(3600)   # killed by the parent


def prefill_rank(rank: int, p: int, d: int, model: str, num_tokens: int, device: str, level: str,
                 addresses: list[Any], go: Any, result_q: Any) -> None:
    import torch

    from engine.kv_cache import KVCache
    from engine.tensor_parallel import kv_heads_of
    from prefill_worker.streamer import KVStreamer

    device = _own_gpu(device)
    cfg, _ = _spec(model, num_tokens, 1, device)
    heads = kv_heads_of(rank, p, cfg.num_kv_heads)
    _, spec = _spec(model, num_tokens, heads[1] - heads[0], device)
    cache = KVCache(spec, device)
    cache.kv.normal_()
    checksum = _sent_sum(cache.kv, num_tokens)
    block_ids = list(range(spec.num_blocks - 1))
    def on_result(rid: str, ok: bool, reason: str | None, info: Any) -> None:
        if not ok:   # the parent stops and shows why instead of waiting for a landing
            result_q.put(("failed", rank, rid, 0.0, reason))

    streamer = KVStreamer(rank, p, cfg.num_kv_heads, cache, on_result)
    streamer.connect({"decode": {"tp": d, "addresses": addresses}})
    spec_msg = {"id": "x", "prompt_token_ids": [1], "max_tokens": 2}
    for i in range(REPEATS + 1):   # the first round connects and warms up
        rid = f"r{i}"
        go.wait()
        t0 = time.time()
        streamer.begin(rid, "decode", spec_msg if rank == 0 else None, num_tokens, level)
        for layer in range(spec.num_layers):
            streamer.send_layer(rid, "decode", layer, block_ids, num_tokens)
        streamer.done(rid, "decode", 1, {})
        result_q.put(("start", rank, rid, t0, checksum))
    time.sleep(3600)


def run_pair(p: int, d: int, model: str, num_tokens: int, device: str, level: str) -> dict[str, Any]:
    import torch
    ctx = mp.get_context("spawn")
    num_gpus = torch.cuda.device_count() if device == "cuda" else 0
    dev = (lambda i: f"cuda:{i % num_gpus}") if num_gpus else (lambda i: "cpu")
    addr_q, result_q = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=decode_rank, args=(j, d, model, num_tokens, dev(num_gpus - 1 - j if num_gpus else 0),
                                                   addr_q, result_q), daemon=True) for j in range(d)]
    for pr in procs:
        pr.start()
    try:
        addresses = [a for _, a in sorted(addr_q.get(timeout=300) for _ in range(d))]
        go = ctx.Barrier(p + 1)
        senders = [ctx.Process(target=prefill_rank, args=(r, p, d, model, num_tokens, dev(r), level, addresses, go,
                                                          result_q), daemon=True) for r in range(p)]
        procs += senders
        for pr in senders:
            pr.start()
        times = []
        for i in range(REPEATS + 1):
            go.wait(timeout=300)
            starts, ends, sums = [], [], {"start": 0.0, "landed": 0.0}
            while len(starts) < p or len(ends) < d:
                kind, _, rid, t, checksum = result_q.get(timeout=90)
                if kind == "failed":
                    raise RuntimeError(f"{p}->{d} {level} {num_tokens} tokens: transfer of {rid} failed: {checksum}")
                assert rid == f"r{i}", f"result for {rid} while timing r{i}"
                (starts if kind == "start" else ends).append(t)
                sums[kind] += checksum
            if level == "raw":   # every head arrived exactly once, unchanged
                assert abs(sums["start"] - sums["landed"]) <= 1e-6 * max(1.0, abs(sums["start"])), sums
            if i > 0:
                times.append(max(ends) - min(starts))
    finally:
        for pr in procs:
            pr.kill()
    cfg, spec = _spec(model, num_tokens, 1, device)
    kv_bytes = spec.bytes_per_token * cfg.num_kv_heads * num_tokens
    t = statistics.median(times)
    return {"src_tp": p, "dst_tp": d, "tokens": num_tokens, "level": level, "transfer_ms": 1000 * t,
            "kv_mb": kv_bytes / 1e6, "gb_per_s": kv_bytes / t / 1e9, "min_ms": 1000 * min(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", default="1:1,2:1,1:2,2:2,4:2")
    ap.add_argument("--tokens", default="2048,8192")
    ap.add_argument("--levels", default="raw")
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for level in args.levels.split(","):
        for n in (int(x) for x in args.tokens.split(",")):
            for pair in args.pairs.split(","):
                p, d = (int(x) for x in pair.split(":"))
                row = run_pair(p, d, args.model, n, args.device, level)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    print(f"{'p->d':>5} {'level':>8} {'tokens':>7} {'KV MB':>8} {'ms':>9} {'GB/s':>7}")
    for r in rows:
        print(f"{r['src_tp']}->{r['dst_tp']:<2} {r['level']:>8} {r['tokens']:>7} {r['kv_mb']:8.1f} "
              f"{r['transfer_ms']:9.1f} {r['gb_per_s']:7.2f}")


if __name__ == "__main__":
    main()
