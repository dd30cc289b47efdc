"""Prefill latency and decode step time per tensor-parallel size (the planner's key input).

    python -m benchmarks.tp_latency --tp 1,2 [--model llama-3-8b] [--out FILE.json]

Spawns one process per rank (CUDA_VISIBLE_DEVICES=rank), each running the engine's TP
runner; rank 0 times prefill of one prompt at each length and decode steps at a batch size.
CUDA graphs are off at every TP size so the sizes compare like for like.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time


def rank_main(rank: int, size: int, port: int, model: str, lengths: list[int], batch: int, context: int,
              device: str) -> None:
    import torch

    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.presets import get_preset
    from engine.request import SamplingParams
    from engine.tp_channel import init_tp
    from engine.tp_runner import TPFollowerRunner, TPLeaderRunner

    cfg = get_preset(model)
    on_cuda = device == "cuda"
    econf = EngineConfig(device=device, dtype=torch.bfloat16 if on_cuda else torch.float32,
                         num_blocks=8192 if on_cuda else 512, max_num_seqs=batch,
                         max_num_batched_tokens=max(lengths), max_model_len=max(lengths) + 64,
                         use_cuda_graphs=False)
    group, channel = init_tp(rank, size, ("127.0.0.1", port), torch.device(device))
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    if rank > 0:
        TPFollowerRunner(cfg, econf, None, tp=group, channel=channel).follow(lambda c: None, lambda c: None)
        return
    engine = LLMEngine(cfg, econf, "continuous", runner=TPLeaderRunner(cfg, econf, None, tp=group, channel=channel))

    def timed_step() -> float:
        sync()
        t = time.perf_counter()
        engine.step()
        sync()
        return time.perf_counter() - t

    out: dict[str, object] = {"tp": size, "model": model,
                              "device": torch.cuda.get_device_name() if on_cuda else "cpu"}
    for length in lengths:
        n = min(length, engine.scheduler.config.max_model_len - 1)   # 8K on an 8K-context model: 8191
        times = []
        for i in range(4):
            engine.add_request([(i * 31 + k) % (cfg.vocab_size - 1) + 1 for k in range(n)], SamplingParams(max_tokens=1))
            times.append(timed_step())
        out[f"prefill_{length}_ms"] = 1000 * statistics.median(times[1:])
    for i in range(batch):
        engine.add_request([(i * 17 + k) % (cfg.vocab_size - 1) + 1 for k in range(context)], SamplingParams(max_tokens=12, ignore_eos=True))
    while any(r.in_prefill for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    steps = [timed_step() for _ in range(8)]
    out[f"decode_b{batch}_ctx{context}_ms"] = 1000 * statistics.median(steps[2:])
    while engine.has_unfinished:
        engine.step()
    engine.runner.shutdown_followers()
    print("RESULT " + json.dumps(out), flush=True)


def run_size(size: int, args: argparse.Namespace) -> dict[str, object]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(size):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(rank)}
        cmd = [sys.executable, "-m", "benchmarks.tp_latency", "--rank", str(rank), "--size", str(size),
               "--port", str(port), "--model", args.model, "--lengths", args.lengths,
               "--batch", str(args.batch), "--context", str(args.context), "--device", args.device]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    result: dict[str, object] = {}
    for rank, p in enumerate(procs):
        stdout, _ = p.communicate(timeout=600)
        for line in stdout.splitlines():
            if line.startswith("RESULT "):
                result = json.loads(line[7:])
        if p.returncode != 0:   # show why a rank failed instead of an empty result
            print(f"tp {size} rank {rank} exited {p.returncode}:\n{stdout[-3000:]}", file=sys.stderr)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--size", type=int, default=1)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.rank is not None:
        rank_main(args.rank, args.size, args.port, args.model, lengths, args.batch, args.context, args.device)
        return
    results = [run_size(int(t), args) for t in args.tp.split(",")]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    keys = [k for k in results[0] if k.endswith("_ms")] if results and results[0] else []
    print(f"{'tp':>3} " + " ".join(f"{k:>22}" for k in keys))
    for r in results:
        print(f"{r.get('tp', '?'):>3} " + " ".join(f"{r.get(k, float('nan')):22.2f}" for k in keys))


if __name__ == "__main__":
    main()
