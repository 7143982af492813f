"""A step's token bitmask for its constrained sequences, filled on a thread while the model runs."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import xgrammar

if TYPE_CHECKING:
    from engine.sequence import Sequence


@dataclass
class GrammarMask:
    """Bit j of `bitmask[row]` is set where the row's grammar allows token j; `rows`: the constrained rows."""

    bitmask: torch.Tensor
    rows: list[int]

    def apply(self, logits: torch.Tensor) -> None:
        """Set every token a constrained row's grammar forbids to -inf, in place; other rows stay as they are."""
        bitmask = self.bitmask.to(logits.device, non_blocking=True)
        xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=self.rows)

    def row(self, row: int) -> Optional["GrammarMask"]:
        """The mask of one row alone, for a logits tensor of that row only; None if the row is unconstrained."""
        return GrammarMask(self.bitmask[row : row + 1], [0]) if row in self.rows else None


class GrammarBitmasks:
    """Fills the bitmask of a step's sampled sequences from their matchers, in the background."""

    def __init__(self, vocab_size: int, max_rows: int) -> None:
        self.bitmask = xgrammar.allocate_token_bitmask(max_rows, vocab_size)
        self.matchers = xgrammar.BatchGrammarMatcher(max_threads=1)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="grammar-bitmask")

    def start(self, seqs: list["Sequence"]) -> Optional[Future[GrammarMask]]:
        """The mask of `seqs` (one row each, in order) being filled; None when no sequence is constrained."""
        rows = [row for row, seq in enumerate(seqs) if seq.grammar is not None]
        if not rows:
            return None
        return self.executor.submit(self._fill, [seqs[row].grammar for row in rows], rows)

    def _fill(self, matchers: list[xgrammar.GrammarMatcher], rows: list[int]) -> GrammarMask:
        bitmask = self.bitmask[: rows[-1] + 1]
        self.matchers.batch_fill_next_token_bitmask(matchers, bitmask, indices=rows)
        return GrammarMask(bitmask, rows)
