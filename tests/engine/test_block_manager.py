"""BlockManager under random alloc / grow / share / free sequences: no block is leaked,
double-counted or handed out twice, and running out is a clean refusal."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_manager import BlockManager
from engine.errors import OutOfBlocksError

NUM_BLOCKS, BLOCK_SIZE = 32, 4

# (op, a, b): "alloc" a blocks | "grow" table a to b tokens | "share" table a | "free" table a
ops = st.lists(st.tuples(st.sampled_from(["alloc", "grow", "share", "free"]),
                         st.integers(0, 40), st.integers(0, 200)), max_size=80)


def check_invariants(bm: BlockManager, tables: list[list[int]]) -> None:
    free = list(bm._free)
    assert len(free) == len(set(free)), "a block is in the free list twice"
    assert bm.num_free + bm.num_held == bm.num_blocks
    # the refcount of each block is exactly the number of live tables holding it
    held: dict[int, int] = {}
    for t in tables:
        assert len(t) == len(set(t)), "a table holds the same block twice"
        for b in t:
            held[b] = held.get(b, 0) + 1
    for b in range(bm.num_blocks):
        assert bm.refcount(b) == held.get(b, 0)
        assert (b in set(free)) == (held.get(b, 0) == 0)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_random_sequences_leak_nothing(sequence):
    bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
    tables: list[list[int]] = []
    for op, a, b in sequence:
        if op == "alloc":
            if a <= bm.num_free:
                tables.append(bm.allocate(a))
            else:
                before = bm.num_free
                with pytest.raises(OutOfBlocksError, match="KV blocks"):
                    bm.allocate(a)
                assert bm.num_free == before, "a refused allocation took blocks"
        elif op == "grow" and tables:
            table = tables[a % len(tables)]
            before, free_before = list(table), bm.num_free
            need = max(0, bm.blocks_for(b) - len(table))
            ok = bm.ensure_capacity(table, b)
            assert ok == (need <= free_before)
            if ok:
                assert len(table) >= bm.blocks_for(b) and table[:len(before)] == before
            else:
                assert table == before, "a failed grow changed the table"
        elif op == "share" and tables:
            tables.append(bm.share(tables[a % len(tables)]))
        elif op == "free" and tables:
            bm.free(tables.pop(a % len(tables)))
        check_invariants(bm, tables)
    for t in tables:
        bm.free(t)
    assert bm.num_free == NUM_BLOCKS and bm.num_held == 0
    assert sorted(bm._free) == list(range(NUM_BLOCKS))


def test_grow_refuses_without_change_when_full():
    bm = BlockManager(4, 16)
    table = bm.allocate(3)
    assert not bm.ensure_capacity(table, 5 * 16)      # needs 2 more, 1 free
    assert len(table) == 3 and bm.num_free == 1
    assert bm.ensure_capacity(table, 4 * 16) and bm.num_free == 0


def test_double_free_is_an_error():
    bm = BlockManager(4, 16)
    table = bm.allocate(2)
    bm.free(table)
    with pytest.raises(ValueError, match="double free"):
        bm.free(table)
    assert bm.num_free == 4


def test_empty_cache_is_refused():
    with pytest.raises(OutOfBlocksError, match="num_blocks=0"):
        BlockManager(0, 16)
