"""Which instances serve a request. Pure Python: the runtime's front end and the planner's
simulator both use it.

- prefill: the live instance with the fewest outstanding prompt tokens; none (backpressure)
  when even that one has `max_queued_tokens` outstanding.
- decode: the live instance with the most free KV blocks after what is already promised to
  requests in flight, less a link cost for the (prefill, decode) pair; none when no instance
  could hold the prompt.
- colocated: like prefill, over the colocated pool.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class InstanceLoad:
    name: str
    alive: bool = True
    outstanding_tokens: int = 0     # prompt tokens dispatched and not yet prefilled
    free_blocks: int = 0            # last reported
    num_blocks: int = 0
    promised_blocks: int = 0        # blocks for transfers dispatched and not yet landed


class Router:
    def __init__(self, prefill: list[str], decode: list[str], block_size: int, max_queued_tokens: int,
                 link_cost: dict[tuple[str, str], float] | None = None, num_blocks: dict[str, int] | None = None) -> None:
        self.block_size = block_size
        self.max_queued_tokens = max_queued_tokens
        self.link_cost = link_cost or {}
        blocks = num_blocks or {}
        self.prefill = {n: InstanceLoad(n, free_blocks=blocks.get(n, 0), num_blocks=blocks.get(n, 0)) for n in prefill}
        self.decode = {n: InstanceLoad(n, free_blocks=blocks.get(n, 0), num_blocks=blocks.get(n, 0)) for n in decode}

    def blocks_for(self, prompt_tokens: int) -> int:
        """KV blocks a decode instance needs for a prompt and its first token."""
        return -(-(prompt_tokens + 1) // self.block_size)

    def pick_prefill(self, prompt_tokens: int) -> str | None:
        live = [p for p in self.prefill.values() if p.alive]
        if not live:
            return None
        best = min(live, key=lambda p: (p.outstanding_tokens, p.name))
        if best.outstanding_tokens > 0 and best.outstanding_tokens + prompt_tokens > self.max_queued_tokens:
            return None
        return best.name

    def pick_decode(self, prefill: str, prompt_tokens: int, exclude: tuple[str, ...] = ()) -> str | None:
        need = self.blocks_for(prompt_tokens)
        live = [d for d in self.decode.values() if d.alive and d.name not in exclude and d.num_blocks >= need]
        if not live:
            return None
        return max(live, key=lambda d: (d.free_blocks - d.promised_blocks
                                        - self.link_cost.get((prefill, d.name), 0.0), d.name)).name

    def largest_decode_blocks(self) -> int:
        return max((d.num_blocks for d in self.decode.values() if d.alive), default=0)

    def dispatched(self, prefill: str, decode: str | None, prompt_tokens: int) -> None:
        self.prefill[prefill].outstanding_tokens += prompt_tokens
        if decode is not None:
            self.promise(decode, prompt_tokens)

    def promise(self, decode: str, prompt_tokens: int) -> None:
        """A transfer of `prompt_tokens` tokens' KV is headed to `decode`."""
        self.decode[decode].promised_blocks += self.blocks_for(prompt_tokens)

    def prefilled(self, prefill: str, prompt_tokens: int) -> None:
        p = self.prefill.get(prefill)
        if p is not None:
            p.outstanding_tokens = max(0, p.outstanding_tokens - prompt_tokens)

    def landed(self, decode: str, prompt_tokens: int) -> None:
        d = self.decode.get(decode)
        if d is not None:
            d.promised_blocks = max(0, d.promised_blocks - self.blocks_for(prompt_tokens))

    def report(self, name: str, free_blocks: int, num_blocks: int) -> None:
        for pool in (self.prefill, self.decode):
            if name in pool:
                pool[name].free_blocks, pool[name].num_blocks = free_blocks, num_blocks

    def mark_dead(self, name: str) -> None:
        for pool in (self.prefill, self.decode):
            if name in pool:
                pool[name].alive = False

    def alive(self, name: str) -> bool:
        load = self.prefill.get(name) or self.decode.get(name)
        return bool(load and load.alive)
