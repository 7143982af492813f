"""Vocabulary-parallel token embedding and language-model head (which may share its weight).

Rank r holds rows [r * ceil(V/N), (r + 1) * ceil(V/N)) of the vocabulary, padding past V. The embedding looks up the
ids it holds and sums over the ranks; the head's logits are gathered on rank 0, which samples.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import TPGroup
from engine.layers.linear import PackableMatmul, check_shape
from engine.layers.sharding import vocab_rows, vocab_rows_per_rank


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.rows = vocab_rows(vocab_size, tp.rank, tp.size)
        self.weight = nn.Parameter(
            torch.empty(vocab_rows_per_rank(vocab_size, tp.size), hidden_size), requires_grad=False
        )

    def load(self, kind: str, tensor: Any, part: int = 0) -> None:
        check_shape(kind, tensor, (self.rows.total, self.weight.shape[1]))
        self.weight[: self.rows.size].copy_(tensor[self.rows.start : self.rows.stop])
        self.weight[self.rows.size :].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.rows.start
        held = (local_ids >= 0) & (local_ids < self.rows.size)
        embeddings = F.embedding(local_ids * held, self.weight) * held.unsqueeze(-1)
        return self.tp.all_reduce(embeddings)


class LMHead(VocabEmbedding, PackableMatmul):
    def forward(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """Logits [T, vocab] on rank 0; None on the other ranks."""
        logits = self.tp.gather_last_dim(self.matmul(hidden))
        return None if logits is None else logits[:, : self.rows.total]
