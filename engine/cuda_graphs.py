"""Decode steps replayed from CUDA graphs.

A decode step of an 8B model is ~420 kernel launches of a few microseconds of work each;
issued from Python (and Triton's launcher, ~100 us a call) they cost more than the step's HBM
time. So decode-only steps run from graphs captured per (padded batch size, table width):

    host inputs -> two pinned staging buffers -> two H2D copies -> graph.replay()
                -> logits [b, vocab] float32 and their argmax [b] (greedy rows need no sampler)

- Batch sizes pad up to `BATCH_BUCKETS`; padded rows have slot -1 (store_kv skips them) and
  context 0 (attention returns 0), so they touch no KV.
- Block tables pad to a power-of-two width (>= 16 blocks). The decode kernel sizes its
  partitions from that width, a host-side number, so each graph's launches are fixed.
- Staging: int64 [3, max_batch] (ids, positions, slots) and, per width, int32
  [max_batch + max_batch * width] (context lens, then the table). A table row is rewritten only
  from the first entry not yet staged: block tables only grow in place or are replaced by a new
  list (BlockManager.ensure_capacity, Scheduler._release), so (list identity, length staged)
  says what is already there; the list is kept referenced so its identity cannot be reused.
- The pinned buffers are rewritten at the next step's `stage`; the runner has synced by then
  (each step's tokens go back to the host), so no copy from them is still in flight.
- Graphs share one memory pool: steps never overlap, and each graph's live outputs are kept
  referenced. `capture_all` records every bucket a sequence can reach before serving starts
  (the runner calls it); a bucket still missing is captured on first use. A capture inside a
  live step compiles and records for up to a second on an 8B model, stalling every request
  in the batch: TTFT/TPOT outliers of 0.4-2.6 s measured on H100 with lazy capture.
"""

from __future__ import annotations

import bisect

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


class _TableStage:
    """Pinned + device int32 [max_batch + max_batch * width]: context lens, then block tables."""

    def __init__(self, max_batch: int, width: int, device: torch.device) -> None:
        self.width = width
        self.host = torch.zeros(max_batch * (1 + width), dtype=torch.int32).pin_memory()
        self.dev = torch.zeros_like(self.host, device=device)
        self.host_ctx = self.host[:max_batch].numpy()
        self.host_rows = self.host[max_batch:].view(max_batch, width).numpy()
        self.dev_ctx = self.dev[:max_batch]
        self.dev_rows = self.dev[max_batch:].view(max_batch, width)
        self.staged: list[tuple[list[int] | None, int]] = [(None, 0)] * max_batch

    def write_rows(self, block_tables: list[list[int]]) -> None:
        for i, row in enumerate(block_tables):
            src, done = self.staged[i]
            if src is not row or done > len(row):
                done = 0
            if done < len(row):
                self.host_rows[i, done:len(row)] = row[done:]
                self.staged[i] = (row, len(row))


class DecodeGraphs:
    """Owns the staging buffers and the captured graphs of one model runner."""

    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, attn_ops: AttentionOps,
                 max_num_seqs: int, device: torch.device) -> None:
        self.model, self.kv_cache, self.attn_ops, self.device = model, kv_cache, attn_ops, device
        self.max_batch = batch_bucket(min(max_num_seqs, BATCH_BUCKETS[-1]))
        # int64 [3, max_batch]: input ids, positions, slot mapping
        self._host64 = torch.zeros(3, self.max_batch, dtype=torch.int64).pin_memory()
        self._dev64 = torch.zeros_like(self._host64, device=device)
        self._dev64[2].fill_(-1)
        self._tables: dict[int, _TableStage] = {}
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._pool = None

    def capture_all(self, max_tokens: int) -> int:
        """Capture every (batch bucket, table width) up to `max_tokens` tokens per sequence;
        call before any step (the staging buffers must still hold their zeroed padding rows,
        which touch no KV). Returns the number of graphs."""
        max_width = width_bucket(-(-max_tokens // self.kv_cache.spec.block_size))
        widths = [MIN_TABLE_WIDTH << i for i in range(32) if MIN_TABLE_WIDTH << i <= max_width]
        for w in widths:
            for b in BATCH_BUCKETS:
                if b <= self.max_batch and (b, w) not in self._graphs:
                    self._capture(b, w)
        return len(self._graphs)

    def can_run(self, num_seqs: int) -> bool:
        return 0 < num_seqs <= self.max_batch

    @property
    def captured(self) -> list[tuple[int, int]]:
        return sorted(self._graphs)

    @torch.inference_mode()
    def stage(self, ids: list[int], positions: list[int], slots: list[int], context_lens: list[int],
              block_tables: list[list[int]]) -> tuple[int, int]:
        """Write one step's inputs into the device buffers (async copies); returns its bucket."""
        n = len(ids)
        b = batch_bucket(n)
        table = self._table(width_bucket(max(len(t) for t in block_tables)))
        h64 = self._host64.numpy()
        h64[0, :n], h64[1, :n], h64[2, :n] = ids, positions, slots
        h64[0, n:b], h64[1, n:b], h64[2, n:b] = 0, 0, -1
        table.host_ctx[:n] = context_lens
        table.host_ctx[n:b] = 0
        table.write_rows(block_tables)
        self._dev64[:, :b].copy_(self._host64[:, :b], non_blocking=True)
        used = self.max_batch + b * table.width   # context lens, then the first b rows
        table.dev[:used].copy_(table.host[:used], non_blocking=True)
        return b, table.width

    @torch.inference_mode()
    def run(self, ids: list[int], positions: list[int], slots: list[int], context_lens: list[int],
            block_tables: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step: (logits [n, vocab] float32, argmax [n] int64), views valid until
        the next step."""
        n = len(ids)
        key = self.stage(ids, positions, slots, context_lens, block_tables)
        graph, logits, argmax = self._graphs.get(key) or self._capture(*key)
        graph.replay()
        return logits[:n], argmax[:n]

    def _table(self, width: int) -> _TableStage:
        if width not in self._tables:
            self._tables[width] = _TableStage(self.max_batch, width, self.device)
        return self._tables[width]

    def _capture(self, b: int, w: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        dev, table = self.device, self._table(w)
        meta = AttentionMetadata(
            slot_mapping=self._dev64[2, :b], num_prefill_tokens=0,
            prefill_block_tables=torch.zeros(0, 1, dtype=torch.int32, device=dev),
            prefill_query_start_loc=torch.zeros(1, dtype=torch.int32, device=dev),
            prefill_context_lens=torch.zeros(0, dtype=torch.int32, device=dev), max_prefill_q_len=0,
            decode_block_tables=table.dev_rows[:b], decode_context_lens=table.dev_ctx[:b])
        ctx = ForwardContext(meta, self.kv_cache, self.attn_ops)
        ids, pos = self._dev64[0, :b], self._dev64[1, :b]

        def step() -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.model.compute_logits(self.model(ids, pos, ctx))
            return logits, logits.argmax(dim=-1)

        # The buffers hold this step's inputs; running them eagerly first (Triton compiles,
        # cuBLAS picks its kernels) is a real step whose KV writes equal the replay's.
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream(dev).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the worker's other threads (KV receivers pinning host memory, decoding
        # on their own streams) keep working while this thread captures; "global" would fail them
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits, argmax = step()
        self._pool = graph.pool()
        self._graphs[(b, w)] = (graph, logits, argmax)
        return graph, logits, argmax
