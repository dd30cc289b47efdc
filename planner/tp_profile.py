"""Step times at TP > 1, measured the way the runtime runs them: one process per rank (each
seeing only its own GPU, as Ray arranges it), rank 0 stepping an `LLMEngine` over a
`TPLeaderRunner` through the same prefill and decode points as the TP 1 profile, the other
ranks following its broadcasts. Deriving TP > 1 from TP 1 is a guess the GPUs contradict
(docs/benchmarks.md: on an H200 a llama-3-8b decode step is 14 ms at TP 1, 28 ms at TP 2,
43 ms at TP 4, without CUDA graphs), so the planner uses these points where they exist.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Callable

from cluster.config import ClusterConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(config: ClusterConfig, rank: int, size: int, port: int, quick: bool, results: Any) -> None:
    try:
        if config.device == "cuda":
            os.environ["CUDA_VISIBLE_DEVICES"] = str(rank)
        import torch

        from engine.tp_channel import init_tp
        from engine.tp_runner import TPFollowerRunner, TPLeaderRunner
        from planner.profile import EngineProfiler, profile_engine_config
        if config.device == "cpu":
            torch.set_num_threads(config.engine.cpu_threads_per_instance or 1)
        model = config.model.source.model_config()
        ec = profile_engine_config(config, model)
        group, channel = init_tp(rank, size, ("127.0.0.1", port), torch.device(config.device))
        if rank > 0:
            TPFollowerRunner(model, ec, None, tp=group, channel=channel).follow(lambda c: None, lambda c: None)
            return
        runner = TPLeaderRunner(model, ec, None, tp=group, channel=channel)
        prof = EngineProfiler(config, quick, log=lambda line: results.put(("log", line)), runner=runner)
        entry = {"prefill": prof.prefill_points(), "decode": prof.decode_points()}
        runner.shutdown_followers()
        results.put(("result", entry))
    except Exception:   # noqa: BLE001 - the parent reports it and the profile goes on without this size
        results.put(("error", f"rank {rank}: {traceback.format_exc(limit=6)}"))


def profile_tp(config: ClusterConfig, tp: int, quick: bool = False, timeout_s: float = 900.0,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """{"prefill": [...], "decode": [...]} at TP `tp`, as `EngineProfiler` measures TP 1.
    Raises RuntimeError with the failing rank's traceback."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(config, r, tp, port, quick, results), daemon=True)
             for r in range(tp)]
    for p in procs:
        p.start()
    try:
        while True:
            kind, payload = results.get(timeout=timeout_s)
            if kind == "log":
                log(f"  [tp{tp}] {payload}")
            elif kind == "error":
                raise RuntimeError(f"TP {tp} profile failed: {payload}")
            else:
                return payload
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
