"""The device side of the engine: owns the model and the KV cache, turns a `ScheduledBatch`
into tensors once per step, runs the forward pass and samples."""

from __future__ import annotations

from typing import Callable

import torch

from engine.attention import AttentionMetadata, get_attention_ops
from engine.config import EngineConfig, ModelConfig
from engine.kv_cache import KVCache, KVCacheSpec
from engine.model import ForwardContext, LlamaForCausalLM
from engine.sampler import sample
from engine.scheduler import ScheduledBatch, ScheduledSeq


class ModelRunner:
    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig,
                 weights: dict[str, torch.Tensor] | None = None) -> None:
        self.model_config = model_config
        self.config = engine_config
        self.device = torch.device(engine_config.device)
        self.dtype = engine_config.dtype
        with torch.device(self.device):
            self.model = LlamaForCausalLM(model_config).to(self.dtype)
        if weights is None:
            self.model.init_dummy_weights()
        else:
            self.model.load_hf_weights(weights)
        self.model.eval()
        self.ops = get_attention_ops(engine_config.attention_backend, self.device)
        spec = KVCacheSpec(model_config.num_layers, model_config.num_kv_heads, model_config.head_dim,
                           engine_config.block_size, 1, self.dtype)
        num_blocks = engine_config.num_blocks or self._blocks_that_fit(spec)
        self.kv_cache = KVCache(KVCacheSpec(spec.num_layers, spec.num_kv_heads, spec.head_dim,
                                            spec.block_size, num_blocks, spec.dtype), self.device)

    def _blocks_that_fit(self, spec: KVCacheSpec) -> int:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - (1 - self.config.gpu_memory_fraction) * total
        else:
            budget = self.config.cpu_kv_bytes
        return max(1, int(budget) // spec.bytes_per_block)

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.spec.num_blocks

    # ---- one step ------------------------------------------------------------------------

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Host lists -> device tensors, once per step."""
        bs = self.config.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for s in batch.seqs:
            tokens = s.request.token_ids[s.start:s.start + s.num_new_tokens]
            input_ids.extend(tokens)
            table = s.request.block_table
            for pos in range(s.start, s.start + s.num_new_tokens):
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
        q_lens = [s.num_new_tokens for s in batch.prefills]
        starts = [0]
        for n in q_lens:
            starts.append(starts[-1] + n)
        dev = self.device

        def tables(seqs: list[ScheduledSeq]) -> torch.Tensor:
            width = max((len(s.request.block_table) for s in seqs), default=0)
            rows = [s.request.block_table + [0] * (width - len(s.request.block_table)) for s in seqs]
            return torch.tensor(rows, dtype=torch.int32).reshape(len(seqs), width).to(dev, non_blocking=True)

        def ctx_lens(seqs: list[ScheduledSeq]) -> torch.Tensor:
            return torch.tensor([s.start + s.num_new_tokens for s in seqs], dtype=torch.int32).to(dev)

        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True),
            num_prefill_tokens=starts[-1],
            prefill_block_tables=tables(batch.prefills),
            prefill_query_start_loc=torch.tensor(starts, dtype=torch.int32).to(dev),
            prefill_context_lens=ctx_lens(batch.prefills),
            max_prefill_q_len=max(q_lens, default=0),
            decode_block_tables=tables(batch.decodes),
            decode_context_lens=ctx_lens(batch.decodes),
        )
        ids = torch.tensor(input_ids, dtype=torch.int64).to(dev, non_blocking=True)
        pos_t = torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True)
        return ids, pos_t, meta

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, on_layer_done: Callable[[int], None] | None = None) -> list[int | None]:
        """Run one step; returns the sampled token for each of `batch.seqs` (None for a
        prefill chunk that does not reach the end of its prompt)."""
        ids, positions, meta = self.prepare(batch)
        ctx = ForwardContext(meta, self.kv_cache, self.ops, on_layer_done)
        hidden = self.model(ids, positions, ctx)
        seqs = batch.seqs
        # the last token of each sequence that samples this step
        ends, offset = [], 0
        for s in seqs:
            offset += s.num_new_tokens
            if s.samples:
                ends.append(offset - 1)
        if not ends:
            return [None] * len(seqs)
        logits = self.model.compute_logits(hidden[torch.tensor(ends, device=self.device)])
        sampling = [s for s in seqs if s.samples]
        tokens = iter(sample(logits, [s.request.params for s in sampling],
                             [s.request.num_tokens for s in sampling]))
        return [next(tokens) if s.samples else None for s in seqs]
