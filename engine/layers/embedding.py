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
from engine.layers.quantization import HoldsCodes
from engine.layers.quantized import GroupCodes, is_codes
from engine.layers.sharding import vocab_rows, vocab_rows_per_rank


class VocabEmbedding(HoldsCodes):
    """Looks rows up in `weight`, or, once a tied LM head is quantized without a dense copy, in its quantized
    weight."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.rows = vocab_rows(vocab_size, tp.rank, tp.size)
        self.weight = nn.Parameter(
            torch.empty(vocab_rows_per_rank(vocab_size, tp.size), hidden_size), requires_grad=False
        )

    def load(self, kind: str, tensor: Any, part: int = 0) -> None:
        check_shape(kind, tensor, (self.rows.total, self.weight.shape[1]))
        if is_codes(tensor):
            self.stage(tensor[self.rows.start : self.rows.stop], 0)
            self._stage_padding(tensor)
            return
        self.weight[: self.rows.size].copy_(tensor[self.rows.start : self.rows.stop])
        self.weight[self.rows.size :].zero_()

    def _stage_padding(self, codes: GroupCodes) -> None:
        """Zero codes and scales for the rows past the vocabulary."""
        padding = self.weight.shape[0] - self.rows.size
        if padding:
            self.stage(codes[:padding].map(torch.zeros_like), self.rows.size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.lookup(input_ids)
        local_ids = input_ids - self.rows.start
        held = (local_ids >= 0) & (local_ids < self.rows.size)
        embeddings = self.lookup(local_ids * held) * held.unsqueeze(-1)
        return self.tp.all_reduce(embeddings)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.weight.numel() or self.quantized is None:
            return F.embedding(ids, self.weight)
        return self.quantized.rows(ids.reshape(-1)).view(*ids.shape, -1)


class LMHead(VocabEmbedding, PackableMatmul):
    def forward(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """Logits [T, vocab] on rank 0; None on the other ranks."""
        logits = self.tp.gather_last_dim(self.matmul(hidden))
        return None if logits is None else logits[:, : self.rows.total]
