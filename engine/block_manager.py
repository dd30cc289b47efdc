"""KV block bookkeeping: a free list and a reference count per block.

Invariants: a block is either free (refcount 0, in the free list) or held (refcount >= 1);
`num_free + num_held == num_blocks` always; freeing drops one reference and a block returns
to the free list when its last reference goes. Shared prefixes (`share`) add references.
Pure Python: the simulator and the schedulers use it without a device.
"""

from __future__ import annotations

from collections import deque

from engine.errors import OutOfBlocksError


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise OutOfBlocksError(f"num_blocks={num_blocks}: the KV cache has no room; give it memory")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refcount = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_held(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self._free):
            raise OutOfBlocksError(f"asked for {num_blocks} KV blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(num_blocks)]
        for b in blocks:
            self._refcount[b] = 1
        return blocks

    def ensure_capacity(self, block_table: list[int], num_tokens: int) -> bool:
        """Grow `block_table` in place to hold `num_tokens`; False (and no change) if it can't."""
        need = self.blocks_for(num_tokens) - len(block_table)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        block_table.extend(self.allocate(need))
        return True

    def share(self, blocks: list[int]) -> list[int]:
        """Take another reference to held blocks (a shared prefix); returns them."""
        for b in blocks:
            if self._refcount[b] <= 0:
                raise ValueError(f"block {b} is free and cannot be shared")
            self._refcount[b] += 1
        return list(blocks)

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._refcount[b] <= 0:
                raise ValueError(f"double free of KV block {b}")
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                self._free.append(b)

    def refcount(self, block: int) -> int:
        return self._refcount[block]
