"""Flat-batch metadata shared by every attention backend."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass
class AttentionMetadata:
    """Sequences are laid out decodes first (one query token each), then prefill chunks.

    `context_lens` counts the tokens of each sequence in the cache once this step's tokens are
    written; the query tokens of sequence i are the last `query_start_loc[i + 1] - query_start_loc[i]`
    of its context. The `*_cpu` fields are host copies for the loops that need them. `max_decode_context_len`
    bounds the decodes' context lengths: their longest in eager steps. In CUDA graphs, which must serve every
    later batch, it and `context_lens_cpu` hold max_model_len.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor
    num_decodes: int
    block_size: int
    query_start_loc_cpu: list[int]
    context_lens_cpu: list[int]
    max_decode_context_len: int
    _cache_rows: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens_cpu)

    @cached_property
    def max_prefill_query_len(self) -> int:
        """The longest query chunk of the sequences after the decodes (0 when there are none)."""
        starts = self.query_start_loc_cpu[self.num_decodes :]
        return max((end - start for start, end in zip(starts, starts[1:])), default=0)

    @cached_property
    def _decode_positions(self) -> torch.Tensor:
        return torch.arange(self.max_decode_context_len, device=self.context_lens.device)

    @cached_property
    def decode_padding_mask(self) -> torch.Tensor:
        """[num_decodes, longest decode context]: True past the end of each decode's context."""
        return self._decode_positions >= self.context_lens[: self.num_decodes, None]

    @cached_property
    def decode_slots(self) -> torch.Tensor:
        """[num_decodes, longest decode context]: the cache slot of every context position (padding included)."""
        rows = torch.arange(self.num_decodes, device=self.block_tables.device).unsqueeze(1)
        return cache_slots(self.block_tables, rows, self._decode_positions.unsqueeze(0), self.block_size)

    def decode_cache_rows(self, num_kv_heads: int) -> torch.Tensor:
        """Flat [num_decodes * num_kv_heads * longest context] rows of a cache viewed as [slots * heads, D], in
        (sequence, head, position) order; the same for every layer, so built once per step."""
        if num_kv_heads not in self._cache_rows:
            heads = torch.arange(num_kv_heads, device=self.decode_slots.device).view(1, -1, 1)
            self._cache_rows[num_kv_heads] = (self.decode_slots.unsqueeze(1) * num_kv_heads + heads).flatten()
        return self._cache_rows[num_kv_heads]


def cache_slots(block_tables: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat cache slots of token `positions` in the sequences `rows` of `block_tables` (broadcast together)."""
    return block_tables[rows, positions // block_size] * block_size + positions % block_size
