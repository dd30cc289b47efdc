"""The device side of the engine: owns the model and the KV cache, turns a `ScheduledBatch`
into tensors once per step, runs the forward pass and samples.

Two paths through `execute`:
- eager: any batch (prefills, chunks, mixed, decodes) and every device; the CPU path runs the
  torch reference ops and is token-exact against transformers;
- graph: decode-only steps on CUDA with `use_cuda_graphs`, replayed from `DecodeGraphs`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from engine.attention import AttentionMetadata, get_attention_ops
from engine.config import EngineConfig, ModelConfig
from engine.cuda_graphs import DecodeGraphs
from engine.fused_ops import get_layer_ops
from engine.kv_cache import KVCache, KVCacheSpec
from engine.model import ForwardContext, LlamaForCausalLM
from engine.request import Request
from engine.sampler import sample
from engine.scheduler import ScheduledBatch, ScheduledSeq
from engine.tensor_parallel import TPGroup, apply_tp


def token_slice(req: Request, start: int, n: int) -> list[int]:
    """req.token_ids[start:start + n] without building the whole list (decode: one token)."""
    prompt, num_prompt = req.prompt_token_ids, req.num_prompt_tokens
    if start + n <= num_prompt:
        return prompt[start:start + n]
    if start >= num_prompt:
        return req.output_token_ids[start - num_prompt:start + n - num_prompt]
    return prompt[start:] + req.output_token_ids[:start + n - num_prompt]


class ModelRunner:
    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig,
                 weights: dict[str, torch.Tensor] | None = None, tp: TPGroup | None = None) -> None:
        self.model_config = model_config
        self.tp = tp
        self.config = engine_config
        self.device = torch.device(engine_config.device)
        self.dtype = engine_config.dtype
        layer_ops = get_layer_ops(engine_config.attention_backend, self.device)
        with torch.device(self.device):
            self.model = LlamaForCausalLM(model_config, layer_ops).to(self.dtype)
        if weights is None:
            self.model.init_dummy_weights()
        else:
            self.model.load_hf_weights(weights)
        if tp is not None and tp.size > 1:
            apply_tp(self.model, tp)
        self.model.eval()
        self.ops = get_attention_ops(engine_config.attention_backend, self.device)
        local_kv_heads = self.model.model.layers[0].self_attn.num_kv_heads
        spec = KVCacheSpec(model_config.num_layers, local_kv_heads, model_config.head_dim,
                           engine_config.block_size, 1, self.dtype)
        num_blocks = engine_config.num_blocks or self._blocks_that_fit(spec)
        if tp is not None and tp.size > 1:
            num_blocks = tp.agree_min(num_blocks)  # one block table drives every rank
        self.kv_cache = KVCache(KVCacheSpec(spec.num_layers, spec.num_kv_heads, spec.head_dim,
                                            spec.block_size, num_blocks, spec.dtype), self.device)
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and engine_config.use_cuda_graphs and (tp is None or tp.size == 1):
            self.graphs = DecodeGraphs(self.model, self.kv_cache, self.ops, engine_config.max_num_seqs, self.device)

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

    def _host_inputs(self, seqs: list[ScheduledSeq]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, positions, slot_mapping), int64 [num_tokens] each, packed in `seqs` order."""
        bs = self.config.block_size
        total = sum(s.num_new_tokens for s in seqs)
        ids, positions, slots = (np.empty(total, dtype=np.int64) for _ in range(3))
        at = 0
        for s in seqs:
            n, start, table = s.num_new_tokens, s.start, s.request.block_table
            ids[at:at + n] = token_slice(s.request, start, n)
            pos = np.arange(start, start + n, dtype=np.int64)
            pages = np.asarray(table[start // bs:(start + n - 1) // bs + 1], dtype=np.int64)
            positions[at:at + n] = pos
            slots[at:at + n] = pages[pos // bs - start // bs] * bs + pos % bs
            at += n
        return ids, positions, slots

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Host lists -> device tensors, once per step."""
        dev = self.device
        ids, positions, slots = self._host_inputs(batch.seqs)
        q_lens = [s.num_new_tokens for s in batch.prefills]
        starts = np.zeros(len(q_lens) + 1, dtype=np.int32)
        np.cumsum(q_lens, out=starts[1:])

        def tables(seqs: list[ScheduledSeq]) -> torch.Tensor:
            width = max((len(s.request.block_table) for s in seqs), default=0)
            rows = np.zeros((len(seqs), width), dtype=np.int32)
            for i, s in enumerate(seqs):
                rows[i, :len(s.request.block_table)] = s.request.block_table
            return torch.from_numpy(rows).to(dev)

        def ctx_lens(seqs: list[ScheduledSeq]) -> torch.Tensor:
            return torch.tensor([s.start + s.num_new_tokens for s in seqs], dtype=torch.int32).to(dev)

        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev),
            num_prefill_tokens=int(starts[-1]),
            prefill_block_tables=tables(batch.prefills),
            prefill_query_start_loc=torch.from_numpy(starts).to(dev),
            prefill_context_lens=ctx_lens(batch.prefills),
            max_prefill_q_len=max(q_lens, default=0),
            decode_block_tables=tables(batch.decodes),
            decode_context_lens=ctx_lens(batch.decodes),
        )
        return torch.from_numpy(ids).to(dev), torch.from_numpy(positions).to(dev), meta

    def decode_graph_inputs(self, batch: ScheduledBatch) -> tuple[list[int], ...]:
        """(ids, positions, slots, context lens, block tables) of a decode-only batch."""
        bs = self.config.block_size
        ids, positions, slots, tables = [], [], [], []
        for s in batch.decodes:   # one token each: plain Python beats numpy per row here
            req, pos = s.request, s.start
            ids.append(token_slice(req, pos, 1)[0])
            positions.append(pos)
            slots.append(req.block_table[pos // bs] * bs + pos % bs)
            tables.append(req.block_table)
        return ids, positions, slots, [p + 1 for p in positions], tables

    def uses_graph(self, batch: ScheduledBatch, on_layer_done: Callable[[int], None] | None = None) -> bool:
        return (self.graphs is not None and not batch.prefills and on_layer_done is None
                and self.graphs.can_run(len(batch.decodes)))

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, on_layer_done: Callable[[int], None] | None = None) -> list[int | None]:
        """Run one step; returns the sampled token for each of `batch.seqs` (None for a
        prefill chunk that does not reach the end of its prompt)."""
        seqs = batch.seqs
        if self.uses_graph(batch, on_layer_done):
            assert self.graphs is not None
            logits, argmax = self.graphs.run(*self.decode_graph_inputs(batch))
            if all(s.request.params.greedy for s in seqs):
                return argmax.tolist()   # what sample() would compute, minus a launch
        else:
            ids, positions, meta = self.prepare(batch)
            ctx = ForwardContext(meta, self.kv_cache, self.ops, on_layer_done)
            hidden = self.model(ids, positions, ctx)
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
