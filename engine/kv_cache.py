"""The paged KV cache: one device tensor holding every layer's key and value blocks.

Layout (the contract shared with kernels/ and kvtransfer/):

    kv: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]   (K at index 0, V at 1)

so `kv[layer, 0]` is that layer's key cache, `[num_blocks, block_size, num_kv_heads, head_dim]`,
contiguous. A token at position `p` of a request lives in block `block_table[p // block_size]`
at offset `p % block_size`; its flat slot is `block_id * block_size + offset`.
Block ids are handed out by `engine.block_manager.BlockManager`; this class only owns memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers, K and V."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size


class KVCache:
    """Owns the cache tensor; hands out per-layer views."""

    def __init__(self, spec: KVCacheSpec, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        self.kv = torch.zeros(
            spec.num_layers, 2, spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim,
            dtype=spec.dtype, device=device,
        )

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer, each [num_blocks, block_size, num_kv_heads, head_dim]."""
        return self.kv[layer_idx, 0], self.kv[layer_idx, 1]

    @staticmethod
    def num_blocks_for_budget(bytes_budget: int, spec_without_blocks: KVCacheSpec) -> int:
        return max(0, bytes_budget // spec_without_blocks.bytes_per_block)
