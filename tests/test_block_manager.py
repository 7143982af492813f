"""KV block accounting: reference counts, chained prefix hashes, LRU eviction of freed cached blocks."""
from __future__ import annotations

from conftest import make_seq
from engine.block_manager import BlockManager
from engine.sequence import Sequence


def admit(manager: BlockManager, seq: Sequence) -> bool:
    """Allocate for all of `seq` and commit it, as a step that computes the whole sequence does."""
    prefix = manager.find_cached_prefix(seq)
    num_new = seq.num_tokens - len(prefix) * manager.block_size
    ok = manager.allocate(seq, num_new, prefix)
    if ok:
        seq.num_computed_tokens = seq.num_tokens
        manager.cache_computed_blocks(seq)
    return ok


def test_allocation_rounds_up_to_blocks_and_free_returns_them() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(10)))
    assert admit(manager, seq)
    assert len(seq.block_table) == 3
    assert manager.stats().num_used_blocks == 3
    manager.free(seq)
    assert manager.stats().num_free_blocks == 8 and seq.block_table == []


def test_decode_appends_a_block_only_at_a_boundary() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(8)))
    admit(manager, seq)
    seq.token_ids.append(99)
    assert manager.allocate(seq, 1) and len(seq.block_table) == 3
    seq.num_computed_tokens += 1
    seq.token_ids.append(100)
    assert manager.allocate(seq, 1) and len(seq.block_table) == 3
    manager.free(seq)


def test_failed_allocation_changes_nothing() -> None:
    manager = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(list(range(12)))
    assert not admit(manager, seq)
    assert seq.block_table == [] and manager.stats().num_free_blocks == 2


def test_prefix_hit_shares_blocks_and_counts_references() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    first, second = make_seq(list(range(9))), make_seq(list(range(8)) + [77, 78])
    admit(manager, first)
    assert manager.find_cached_prefix(second) == first.block_table[:2]
    admit(manager, second)
    assert second.num_cached_tokens == 8 and second.block_table[:2] == first.block_table[:2]
    assert [manager.blocks[b].ref_count for b in first.block_table] == [2, 2, 1]
    stats = manager.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (19, 8)
    manager.free(first)
    manager.free(second)
    assert manager.stats().num_free_blocks == 8


def test_last_token_is_never_served_from_cache() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(8)))
    admit(manager, seq)
    manager.free(seq)
    again = make_seq(list(range(8)))
    assert len(manager.find_cached_prefix(again)) == 1


def test_hash_chain_depends_on_the_parent_block() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit(manager, seq)
    other_parent = make_seq([9, 9, 9, 9, 5, 6, 7, 8, 9])
    assert manager.find_cached_prefix(other_parent) == []
    manager.free(seq)


def test_freed_cached_blocks_stay_hittable_then_evict_least_recent_first() -> None:
    manager = BlockManager(num_blocks=4, block_size=4)
    old, recent = make_seq(list(range(5))), make_seq(list(range(100, 105)))
    admit(manager, old)
    manager.free(old)
    admit(manager, recent)
    manager.free(recent)
    assert len(manager.find_cached_prefix(make_seq(list(range(5))))) == 1
    filler = make_seq(list(range(200, 209)))
    admit(manager, filler)
    assert manager.find_cached_prefix(make_seq(list(range(5)))) == []
    assert len(manager.find_cached_prefix(make_seq(list(range(100, 105))))) == 1
    manager.free(filler)


def test_reviving_a_free_cached_block_takes_it_off_the_free_list() -> None:
    manager = BlockManager(num_blocks=3, block_size=4)
    seq = make_seq(list(range(5)))
    admit(manager, seq)
    manager.free(seq)
    revived = make_seq(list(range(4)) + [50, 51, 52, 53, 54])
    assert admit(manager, revived)
    assert manager.stats().num_free_blocks == 0
    assert not admit(manager, make_seq([7, 7]))
    manager.free(revived)
    assert manager.stats().num_free_blocks == 3


def test_prefix_caching_disabled_never_hits() -> None:
    manager = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    seq = make_seq(list(range(9)))
    admit(manager, seq)
    assert manager.find_cached_prefix(make_seq(list(range(9)))) == []
    assert manager.stats().prefix_cache_queries == 0
    manager.free(seq)
