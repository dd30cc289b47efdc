"""Decode steps replayed from CUDA graphs.

A decode step of a 8B model is ~350 kernel launches of a few microseconds of work each; issued
from Python (and Triton's launcher) they cost more than the step's HBM time. So decode-only
steps run from graphs captured per (padded batch size, block-table width bucket):

    prepare (host, numpy) -> copy into static pinned/device buffers -> graph.replay() -> logits

- Batch sizes pad up to `BATCH_BUCKETS`; padded rows have slot -1 (store_kv skips them) and
  context 0 (attention returns 0), so they touch no KV.
- Block tables pad to a power-of-two width (>= 16 blocks). The decode kernel sizes its
  partitions from that width, a host-side number, so each graph's launch is fixed.
- Graphs are captured lazily, on a bucket's first use, and share one memory pool: steps never
  overlap, and each graph's only live output (its logits buffer) is kept referenced.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from engine.attention import AttentionMetadata, AttentionOps
from engine.kv_cache import KVCache
from engine.model import ForwardContext, LlamaForCausalLM

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
MIN_TABLE_WIDTH = 16


def batch_bucket(n: int) -> int:
    return BATCH_BUCKETS[bisect.bisect_left(BATCH_BUCKETS, n)]


def width_bucket(num_blocks: int) -> int:
    return max(MIN_TABLE_WIDTH, 1 << max(0, num_blocks - 1).bit_length())


class DecodeGraphs:
    """Owns the static input buffers and the captured graphs of one model runner."""

    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, attn_ops: AttentionOps,
                 max_num_seqs: int, device: torch.device) -> None:
        self.model, self.kv_cache, self.attn_ops, self.device = model, kv_cache, attn_ops, device
        self.max_batch = batch_bucket(min(max_num_seqs, BATCH_BUCKETS[-1]))
        b = self.max_batch
        # host staging (pinned, so the copies are async DMA) and device inputs, [max_batch]
        self._host = {name: torch.zeros(b, dtype=dt).pin_memory() for name, dt in
                      (("ids", torch.int64), ("pos", torch.int64), ("slots", torch.int64), ("ctx", torch.int32))}
        self._dev = {name: torch.zeros(b, dtype=t.dtype, device=device) for name, t in self._host.items()}
        self._dev["slots"].fill_(-1)
        self._host_tables: dict[int, torch.Tensor] = {}   # width -> pinned int32 [max_batch, width]
        self._dev_tables: dict[int, torch.Tensor] = {}    # width -> int32 [max_batch, width]
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def can_run(self, num_seqs: int) -> bool:
        return 0 < num_seqs <= self.max_batch

    @property
    def captured(self) -> list[tuple[int, int]]:
        return sorted(self._graphs)

    def run(self, ids: list[int], positions: list[int], slots: list[int], context_lens: list[int],
            block_tables: list[list[int]]) -> torch.Tensor:
        """One decode step; returns logits [num_seqs, vocab] float32 (a view valid until the
        next step)."""
        n = len(ids)
        b = batch_bucket(n)
        w = width_bucket(max(len(t) for t in block_tables))
        host = {k: v.numpy() for k, v in self._host.items()}
        host["ids"][:n], host["pos"][:n], host["slots"][:n], host["ctx"][:n] = ids, positions, slots, context_lens
        host["ids"][n:b], host["pos"][n:b], host["slots"][n:b], host["ctx"][n:b] = 0, 0, -1, 0
        table = self._tables(w)[0].numpy()
        for i, row in enumerate(block_tables):
            table[i, :len(row)] = row
        for k in self._dev:
            self._dev[k][:b].copy_(self._host[k][:b], non_blocking=True)
        host_t, dev_t = self._tables(w)
        dev_t[:b].copy_(host_t[:b], non_blocking=True)
        graph, logits = self._graphs.get((b, w)) or self._capture(b, w)
        graph.replay()
        return logits[:n]

    def _tables(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        if width not in self._dev_tables:
            self._host_tables[width] = torch.zeros(self.max_batch, width, dtype=torch.int32).pin_memory()
            self._dev_tables[width] = torch.zeros(self.max_batch, width, dtype=torch.int32, device=self.device)
        return self._host_tables[width], self._dev_tables[width]

    def _capture(self, b: int, w: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=self._dev["slots"][:b], num_prefill_tokens=0,
            prefill_block_tables=torch.zeros(0, 1, dtype=torch.int32, device=dev),
            prefill_query_start_loc=torch.zeros(1, dtype=torch.int32, device=dev),
            prefill_context_lens=torch.zeros(0, dtype=torch.int32, device=dev), max_prefill_q_len=0,
            decode_block_tables=self._tables(w)[1][:b], decode_context_lens=self._dev["ctx"][:b])
        ctx = ForwardContext(meta, self.kv_cache, self.attn_ops)
        ids, pos = self._dev["ids"][:b], self._dev["pos"][:b]
        # The inputs hold this step's values; running them eagerly first (Triton compiles,
        # cuBLAS picks its kernels) is a real step whose KV writes are the same as the replay's.
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            self.model.compute_logits(self.model(ids, pos, ctx))
        torch.cuda.current_stream(dev).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.model.compute_logits(self.model(ids, pos, ctx))
        self._pool = graph.pool()
        self._graphs[(b, w)] = (graph, logits)
        return graph, logits
