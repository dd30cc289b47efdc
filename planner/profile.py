"""Measure the engine on the hardware at hand: what the latency and transfer models are fit to.

    prefill   one engine step over `num_seqs` prompts of `length` tokens (LLMEngine.step, so
              scheduling, input prep and sampling are in the time, as in the runtime)
    decode    engine steps at batch B with every request at context C
    link      loopback TCP throughput (the KV channel's transport), and on a GPU the
              device-to-host copy the sender's gather does
    codec     encode/decode speed and all-in bits/element of each level on real KV from a prefill
    colocation  CPU: step-time stretch while k instances share the node's cores, each in its own
              process with the deployment's threads (planner.colocation)
    serving_overhead  the runtime's own time per step beyond LLMEngine.step, measured on the
              running cluster one request at a time (planner.overhead)

Per TP size: TP=1 always; larger sizes with `tp_sizes` (planner.tp_profile: one process per
rank, as the runtime runs them); sizes not measured are derived from a measured one.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from typing import Any, Callable

import torch

from cluster.config import ClusterConfig
from engine.config import EngineConfig, ModelConfig, parse_dtype
from engine.engine import LLMEngine
from engine.request import SamplingParams


def _median_time(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def profile_engine_config(config: ClusterConfig, model: ModelConfig) -> EngineConfig:
    """The engine the profile steps (every TP rank builds the same one)."""
    return EngineConfig(block_size=config.engine.block_size, num_blocks=None,
                        max_num_seqs=max(config.decode.max_batch_size, 64),
                        max_num_batched_tokens=max(config.prefill.max_batch_tokens, 256, 2048),
                        max_model_len=min(model.max_position_embeddings, config.engine.max_model_len or 4096),
                        dtype=parse_dtype(config.model.dtype), device=config.device,
                        gpu_memory_fraction=config.decode.memory_fraction,
                        cpu_kv_bytes=2 << 30, extra={"chunk_size": None})


class EngineProfiler:
    def __init__(self, config: ClusterConfig, quick: bool = False, log: Callable[[str], None] = print,
                 runner: Any = None) -> None:
        """`runner`: a TP rank-0 runner (planner.tp_profile); None for one device."""
        self.config = config
        self.quick = quick
        self.log = log
        self.model = config.model.source.model_config()
        self.vocab = min(1000, self.model.vocab_size - 1)   # synthetic prompts use token ids 1..vocab
        self.max_len = min(self.model.max_position_embeddings, config.engine.max_model_len or 4096)
        self.max_batch_tokens = max(config.prefill.max_batch_tokens, 256)
        self.max_batch = config.decode.max_batch_size
        # dummy weights time the same as real ones and load in a moment
        self.engine = LLMEngine(self.model, profile_engine_config(config, self.model), policy="continuous",
                                runner=runner)
        cuda = config.device == "cuda"
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.repeats = 3 if quick or not cuda else 5

    def close(self) -> None:
        """Give the engine's device memory back (the serving phase starts a cluster on this GPU:
        with the profiling engine's weights and cache still held, its instances ran out of memory)."""
        self.engine = None
        if self.config.device == "cuda":
            import gc
            gc.collect()
            torch.cuda.empty_cache()

    def _add(self, n: int, length: int, max_tokens: int) -> list[Any]:
        return [self.engine.add_request([1 + (i * 7 + j) % self.vocab for j in range(length)],
                                        SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for i in range(n)]

    def _clear(self, reqs: list[Any]) -> None:
        for r in reqs:
            self.engine.abort(r.request_id)

    def prefill_points(self) -> list[dict[str, float]]:
        lengths = [16, 64, 256, 512, 1024, 2048, 4096]
        lengths = [n for n in lengths if n <= self.max_batch_tokens and n < self.max_len - 2]
        rows = []
        for length in lengths:
            for num in (1, 2, 4, 8):
                if num * length > self.max_batch_tokens or (self.quick and num not in (1, 4)):
                    continue

                def one() -> None:
                    reqs = self._add(num, length, 2)
                    self.engine.step()
                    self._clear(reqs)
                one()  # warm-up (and CUDA kernels' first launch)
                t = _median_time(one, self.repeats, self.sync)
                rows.append({"num_seqs": num, "length": length, "num_tokens": num * length,
                             "attn": num * length * length, "time_s": t})
                self.log(f"  prefill {num} x {length}: {t * 1e3:.2f} ms")
        return rows

    def decode_points(self) -> list[dict[str, float]]:
        batches = sorted({b for b in (1, 4, 16, 32, 64, 128, 256) if b <= self.max_batch} | {self.max_batch})
        contexts = [64, 256, 1024] if self.config.device == "cpu" else [128, 512, 2048]
        budget = 16384 if self.config.device == "cpu" else 1 << 20  # tokens to prefill per point
        rows = []
        for b in batches:
            for ctx in contexts:
                if b * ctx > budget or ctx + 66 >= self.max_len:
                    continue
                reqs = self._add(b, ctx, 64)
                while any(r.in_prefill for r in reqs):
                    self.engine.step()
                self.engine.step()  # warm-up at this shape
                t = _median_time(self.engine.step, self.repeats, self.sync)
                rows.append({"batch": b, "context": ctx, "sum_context": b * (ctx + 2), "time_s": t})
                self._clear(reqs)
                self.log(f"  decode batch {b} context {ctx}: {t * 1e3:.2f} ms")
        return rows

    def sample_kv(self, num_tokens: int = 512) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], Any]:
        """Real KV of one prompt, per layer, on the engine's device (where the channel codes it)."""
        from kernels.reference import gather_kv_blocks
        reqs = self._add(1, num_tokens, 2)
        self.engine.step()
        cache = self.engine.runner.kv_cache
        ids = torch.tensor(reqs[0].block_table, dtype=torch.int64, device=self.engine.runner.device)
        layers = []
        for i in range(self.model.num_layers):
            k, v = gather_kv_blocks(*cache.layer(i), ids, num_tokens)
            layers.append((k.clone(), v.clone()))
        self._clear(reqs)
        return layers, ids


def channel_link(model: ModelConfig, dtype: torch.dtype, device: str, max_tokens: int,
                 copy_bytes_per_s: float | None) -> dict[str, float]:
    """The KV channel as the transfer model sees it, from the real channel
    (kvtransfer.channel_probe) at two request sizes: with requests queued back to back, how
    long each occupies it (bytes/s on the wire plus a fixed cost per message: the probe's
    layers are all queued at once, so each request goes as one run); alone, how much longer one
    takes to land (`latency_s`: thread hand-offs and round trips that overlap the next request,
    so they delay a request without using the channel). The sender's device-to-host copy is in
    the probe's time, and the model counts it separately, so it is taken out of the wire rate."""
    from kvtransfer.channel_probe import measure_channel
    small, large = 256, max(512, min(2048, max_tokens))

    def probe(n: int, in_flight: int):  # noqa: ANN202
        return measure_channel(model.num_layers, model.num_kv_heads, model.head_dim, n, dtype, device,
                               in_flight=in_flight)
    busy = [probe(n, 4) for n in (small, large)]
    alone = [probe(n, 1) for n in (small, large)]
    points = [(r.bytes_per_s * r.per_request_s, r.per_request_s) for r in busy]
    latency = min(max(0.0, a.per_request_s - b.per_request_s) for a, b in zip(alone, busy))
    return {**fit_link(points, copy_bytes_per_s), "latency_s": latency,
            "probe": [{"num_tokens": r.num_tokens, "in_flight": r.in_flight, "bytes_per_s": r.bytes_per_s}
                      for r in busy + alone]}


def fit_link(points: list[tuple[float, float]], copy_bytes_per_s: float | None) -> dict[str, float]:
    """(bytes, seconds) per message at two sizes -> wire bytes/s and fixed seconds per message
    (a run of layers), the copy's share of the slope taken out (the transfer model adds it back)."""
    (b0, t0), (b1, t1) = points
    per_byte = max((t1 - t0) / (b1 - b0), 1e-12)
    if copy_bytes_per_s:
        per_byte = max(per_byte - 1.0 / copy_bytes_per_s, per_byte / 2)
    return {"bytes_per_s": 1.0 / per_byte, "per_run_s": max(0.0, t1 - b1 * per_byte)}


def loopback_tcp_bytes_per_s(total: int = 256 << 20, chunk: int = 4 << 20) -> float:
    """Throughput of one TCP connection over loopback, like one KV channel."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    got = [0]

    def sink() -> None:
        conn, _ = server.accept()
        while got[0] < total:
            data = conn.recv(1 << 20)
            if not data:
                break
            got[0] += len(data)
        conn.close()
    th = threading.Thread(target=sink, daemon=True)
    th.start()
    s = socket.create_connection(server.getsockname())
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytes(chunk)
    t = time.perf_counter()
    sent = 0
    while sent < total:
        s.sendall(bytes(memoryview(buf)))  # the channel copies each body once, as here
        sent += chunk
    th.join()
    dt = time.perf_counter() - t
    s.close()
    server.close()
    return total / dt


def codec_rates(layers: list[tuple[torch.Tensor, torch.Tensor]], levels: tuple[str, ...], max_layers: int = 4) -> dict[str, dict[str, float]]:
    """Per level: all-in bits per element, and encode/decode time of a run of layers as a fixed
    cost per run plus raw bytes / rate (two sizes: the whole sample and a quarter of its tokens;
    a GPU codec's launches and host reads are a fixed cost that dominates short prompts). Timed
    with the channel's own LayerPacker / LayerUnpacker on runs of `max_layers` layers, where the
    channel runs them: on the GPU when the KV lives there, else on the CPU. One untimed run
    first (compilation)."""
    from kvtransfer.payload import LayerPacker, LayerUnpacker, layout_of
    k0 = layers[0][0]
    n, h, d = k0.shape
    device = k0.device
    layout = layout_of(len(layers), h, d, k0.dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def flat(body: Any) -> bytearray:
        return bytearray(b"".join(bytes(s) for s in body) if isinstance(body, list) else bytes(body))

    def timed(level: str, tokens: int) -> tuple[float, float, int, int]:
        """(encode s, decode s, raw bytes, wire bytes) of one run at `tokens` tokens."""
        run = torch.stack([torch.stack([k[:tokens], v[:tokens]]) for k, v in layers[:max_layers]])
        packer = LayerPacker(layout, level, tokens)
        unpacker = LayerUnpacker(layout, level, tokens, packer.stream_header(), device=device)
        m = run.shape[0]
        sync()
        body, sizes = packer.pack_layers(0, run)
        unpacker.unpack_layers(flat(body), 0, m, sizes)
        sync()
        t = time.perf_counter()
        body, sizes = packer.pack_layers(0, run)
        wire = flat(body)
        enc = time.perf_counter() - t
        t = time.perf_counter()
        unpacker.unpack_layers(wire, 0, m, sizes)
        sync()
        dec = time.perf_counter() - t
        return enc, dec, run.numel() * run.element_size(), len(wire)

    out = {}
    for level in levels:
        small, large = timed(level, max(1, n // 4)), timed(level, n)
        entry: dict[str, Any] = {"bits_per_element": 8.0 * large[3] / (large[2] / k0.element_size()),
                                 "dtype_bits": 8 * k0.element_size(), "device": device.type}
        for i, what in ((0, "encode"), (1, "decode")):
            per_byte = max((large[i] - small[i]) / max(large[2] - small[2], 1), 1e-15)
            fixed = max(0.0, large[i] - large[2] * per_byte)
            # rate: raw bytes/s at the sampled size (what older profiles store); the fixed part apart
            entry[f"{what}_bytes_per_s"] = large[2] / large[i]
            entry[f"{what}_per_run_s"] = fixed
            entry[f"{what}_marginal_bytes_per_s"] = 1.0 / per_byte
        out[level] = entry
    return out


def device_to_host_bytes_per_s(nbytes: int = 64 << 20) -> float | None:
    """Device -> pinned host copy rate: how the channel's sender takes raw KV off the GPU (a
    pageable copy runs ~20x slower on H100 and would make every layer look copy-bound)."""
    if not torch.cuda.is_available():
        return None
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.copy_(x, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        host.copy_(x, non_blocking=True)
    torch.cuda.synchronize()
    return 5 * nbytes / (time.perf_counter() - t)


def profile(config: ClusterConfig, quick: bool = False, levels: tuple[str, ...] = ("raw", "lossless", "int8", "default", "aggressive"),
            log: Callable[[str], None] = print, colocate: int | None = None, serving: bool = True,
            tp_sizes: tuple[int, ...] = (1,)) -> dict[str, Any]:
    """`colocate`: instances sharing a CPU node to measure (default: the config's, at least
    one more than fit the cores); `serving`: measure the runtime's overhead on a running cluster;
    `tp_sizes`: TP sizes to measure besides 1 (one process per rank; the rest are derived)."""
    t0 = time.monotonic()
    threads = config.engine.cpu_threads_per_instance or 1
    if config.device == "cpu":
        torch.set_num_threads(threads)
    notes = []
    prof = EngineProfiler(config, quick, log)
    log("prefill steps")
    pre = prof.prefill_points()
    log("decode steps")
    dec = prof.decode_points()
    per_tp = {"1": {"prefill": pre, "decode": dec}}
    for tp in sorted(set(tp_sizes) - {1}):
        log(f"TP {tp} steps (one process per rank)")
        try:
            from planner.tp_profile import profile_tp
            per_tp[str(tp)] = profile_tp(config, tp, quick, log=log)
        except Exception as exc:  # the other sizes stand; the planner derives this one
            notes.append(f"TP {tp} not profiled: {str(exc).splitlines()[-1][:200]}")
            log(f"  {notes[-1]}")
    if len(per_tp) == 1:
        notes.append("only TP 1 profiled (splitserve profile --tp-sizes adds more); the planner derives "
                     "TP>1 step times from TP 1")
    log("KV link and codec")
    layers, _ = prof.sample_kv(min(512, prof.max_batch_tokens))
    copy_rate = device_to_host_bytes_per_s()
    socket_rate = loopback_tcp_bytes_per_s()
    link = channel_link(prof.model, parse_dtype(config.model.dtype), config.device, prof.max_len - 2, copy_rate)
    link["socket_bytes_per_s"] = socket_rate
    log(f"  KV channel: {link['bytes_per_s'] / 1e9:.2f} GB/s + {link['per_run_s'] * 1e6:.0f} us per message "
        f"busy, +{link['latency_s'] * 1e3:.1f} ms latency alone (bare loopback socket {socket_rate / 1e9:.2f} GB/s)")
    codec = codec_rates(layers, levels)
    del layers
    prof.close()
    name = torch.cuda.get_device_name() if config.device == "cuda" else "cpu"
    colocation = None
    if config.device == "cpu":
        import os
        from planner.colocation import measure_sharing
        k = colocate or max(2, config.prefill.instances + config.decode.instances, (os.cpu_count() or 1) // threads + 1)
        log(f"co-location: up to {k} instances of {threads} thread(s) on {os.cpu_count()} cores")
        colocation = measure_sharing(config, k, threads, 3.0 if quick else 6.0, log=log).to_json()
    overhead = None
    if serving:
        from planner.latency import fit_step_model
        from planner.overhead import measure_overhead
        log("serving overhead (1P1D cluster, one request at a time)")
        try:
            overhead = measure_overhead(config, fit_step_model(1, pre, dec), 4 if quick else 8, log=log)
        except Exception as exc:  # the step profile stands without it; say why it is missing
            notes.append(f"serving overhead not measured: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            log(f"  {notes[-1]}")
    out = {
        "model": prof.model.name, "weights": config.model.weights, "dtype": config.model.dtype,
        "device": config.device, "device_name": name, "num_threads": threads if config.device == "cpu" else None,
        "block_size": config.engine.block_size,
        "tp": per_tp,
        "links": {"tcp": link},
        "copy_bytes_per_s": copy_rate,
        "codec": codec,
        "colocation": colocation,
        "serving_overhead": overhead,
        "memory_bytes": torch.cuda.get_device_properties(0).total_memory if config.device == "cuda" else None,
        "notes": notes, "profile_s": None,
    }
    out["profile_s"] = time.monotonic() - t0
    return out
