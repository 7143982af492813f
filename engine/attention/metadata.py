"""Flat-batch metadata shared by every attention backend."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Sequences are laid out decodes first (one query token each), then prefill chunks.

    `context_lens` counts the tokens of each sequence in the cache once this step's tokens are
    written; the query tokens of a sequence are the last `query_lens[i]` of its context.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor
    num_decodes: int
    query_lens_cpu: list[int]
    context_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)
