"""KV-cache block accounting: free list, reference counts and automatic prefix caching.

A full block is identified by a chained hash of (parent block hash, its token ids); a sequence's first block
has its request's `prefix_cache_root` as parent (its LoRA adapter, or None). It becomes
hittable only once its KV exists: `cache_computed_blocks`, called after the step that computed it,
so a step that fails leaves nothing hittable that was never written. A block whose last reference
is dropped keeps its hash and stays hittable until it is handed out again; free blocks are handed
out least recently freed first, so cached blocks are evicted in LRU order.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Optional

from engine.sequence import Sequence

BlockKey = tuple[Optional[Hashable], tuple[int, ...]]  # (parent block hash, or the chain's root; token ids)


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: Optional[int] = None
    key: Optional[BlockKey] = None


@dataclass
class BlockStats:
    num_total_blocks: int
    num_free_blocks: int
    num_used_blocks: int
    num_cached_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached_blocks: dict[int, Block] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached prefix of `seq`, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent = seq.request.prefix_cache_root
        for start in range(0, seq.num_tokens - 1 - self.block_size + 1, self.block_size):
            key = (parent, tuple(seq.token_ids[start : start + self.block_size]))
            block = self.cached_blocks.get(hash(key))
            if block is None or block.key != key:
                break
            hits.append(block.block_id)
            parent = block.block_hash
        return hits

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_prefix: list[int] = ()) -> bool:
        """Give `seq` blocks for `num_new_tokens` more tokens; False (and nothing changed) if too few are free.

        A sequence with no blocks yet first takes `cached_prefix`, the result of `find_cached_prefix`.
        """
        is_new = not seq.block_table
        num_computed = len(cached_prefix) * self.block_size if is_new else seq.num_computed_tokens
        num_held = len(cached_prefix) if is_new else len(seq.block_table)
        num_needed = max(-(-(num_computed + num_new_tokens) // self.block_size) - num_held, 0)
        num_revived = sum(1 for b in cached_prefix if self.blocks[b].ref_count == 0)
        if num_needed + num_revived > len(self.free_blocks):
            return False
        if is_new:
            self._take_prefix(seq, cached_prefix)
        seq.block_table.extend(self._pop_free_block() for _ in range(num_needed))
        return True

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Make `seq`'s full blocks hittable up to `seq.num_computed_tokens`: call once their step has run."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        for index in range(seq.num_hashed_blocks, num_full):
            parent = self.blocks[seq.block_table[index - 1]].block_hash if index else seq.request.prefix_cache_root
            block = self.blocks[seq.block_table[index]]
            start = index * self.block_size
            block.key = (parent, tuple(seq.token_ids[start : start + self.block_size]))
            block.block_hash = hash(block.key)
            self.cached_blocks.setdefault(block.block_hash, block)
        seq.num_hashed_blocks = num_full

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block_id] = None
                if block.block_hash is None:
                    self.free_blocks.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_hashed_blocks = 0

    def stats(self) -> BlockStats:
        num_free = len(self.free_blocks)
        return BlockStats(
            num_total_blocks=len(self.blocks),
            num_free_blocks=num_free,
            num_used_blocks=len(self.blocks) - num_free,
            num_cached_blocks=len(self.cached_blocks),
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
        )

    def _take_prefix(self, seq: Sequence, cached_prefix: list[int]) -> None:
        for block_id in cached_prefix:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_blocks[block_id]
            block.ref_count += 1
        seq.block_table = list(cached_prefix)
        seq.num_hashed_blocks = len(cached_prefix)
        seq.num_computed_tokens = seq.num_cached_tokens = len(cached_prefix) * self.block_size
        if self.enable_prefix_caching:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += seq.num_computed_tokens

    def _pop_free_block(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None and self.cached_blocks.get(block.block_hash) is block:
            del self.cached_blocks[block.block_hash]
        block.block_hash = block.key = None
        block.ref_count = 1
        return block_id
