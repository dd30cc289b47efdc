"""Who sends which KV heads to whom when prefill TP = p and decode TP = d.

Each decode rank receives exactly the heads it owns, each from one prefill rank that holds
it (the lowest, when prefill replicates KV heads); nothing is gathered on one rank first.
Example, 8 KV heads, p=2 -> d=4: prefill rank 0 sends heads 0-1 to decode rank 0 and 2-3 to
decode rank 1; prefill rank 1 sends 4-5 to rank 2 and 6-7 to rank 3.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.tensor_parallel import kv_heads_of

HeadRange = tuple[int, int]


@dataclass(frozen=True)
class ReshardPlan:
    num_kv_heads: int
    src_tp: int
    dst_tp: int

    def _source_of(self, head: int) -> int:
        return next(r for r in range(self.src_tp) if kv_heads_of(r, self.src_tp, self.num_kv_heads)[0] <= head
                    < kv_heads_of(r, self.src_tp, self.num_kv_heads)[1])

    def routes(self, src_rank: int) -> list[tuple[int, HeadRange]]:
        """(decode rank, global head range) pairs that `src_rank` sends."""
        out = []
        for dst in range(self.dst_tp):
            lo, hi = kv_heads_of(dst, self.dst_tp, self.num_kv_heads)
            mine = [h for h in range(lo, hi) if self._source_of(h) == src_rank]
            if mine:
                out.append((dst, (mine[0], mine[-1] + 1)))
        return out

    def num_sources(self, dst_rank: int) -> int:
        """How many prefill ranks send to `dst_rank` (frames it waits for per layer)."""
        lo, hi = kv_heads_of(dst_rank, self.dst_tp, self.num_kv_heads)
        return len({self._source_of(h) for h in range(lo, hi)})
