"""A step's token bitmask for its constrained sequences, filled on a thread while the model runs.

xgrammar is imported on first use: it takes most of a second, which only engines that serve a constraint pay."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from engine.native.build import native_error

if TYPE_CHECKING:
    import xgrammar

    from engine.sequence import Sequence

BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


@dataclass
class GrammarMask:
    """Bit j of `bitmask[row]` is set where the row's grammar allows token j; `rows`: the constrained rows."""

    bitmask: torch.Tensor
    rows: list[int]

    def apply(self, logits: torch.Tensor) -> None:
        """Set every token a constrained row's grammar forbids to -inf, in place (float32 logits); other rows stay
        as they are. On CUDA xgrammar's kernel does it, on the CPU the native kernel, else the PyTorch reference."""
        if logits.device.type == "cuda":
            import xgrammar

            bitmask = self.bitmask.to(logits.device, non_blocking=True)
            xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=self.rows)
        elif logits.device.type == "cpu" and native_error() is None:
            torch.ops.pagedserve.apply_token_bitmask_(logits, self.bitmask, torch.tensor(self.rows))
        else:
            apply_token_bitmask(logits, self.bitmask.to(logits.device), self.rows)

    def row(self, row: int) -> Optional["GrammarMask"]:
        """The mask of one row alone, for a logits tensor of that row only; None if the row is unconstrained."""
        return GrammarMask(self.bitmask[row : row + 1], [0]) if row in self.rows else None


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """The reference: logits[row, j] = -inf in each of `rows` where bit j of bitmask[row] (int32 words, bit j of word
    w is token 32 w + j) is clear."""
    index = torch.tensor(rows, device=logits.device)
    as_bytes = bitmask[index].view(torch.uint8)  # little-endian: token 8 k + b is bit b of byte k
    bits = (as_bytes.unsqueeze(-1) >> BIT_SHIFTS.to(logits.device)) & 1
    banned = bits.view(len(rows), -1)[:, : logits.shape[1]] == 0
    logits[index] = logits[index].masked_fill(banned, float("-inf"))


class GrammarBitmasks:
    """Fills the bitmask of a step's sampled sequences from their matchers, in the background."""

    def __init__(self, vocab_size: int, max_rows: int) -> None:
        self.bitmask = torch.full((max_rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)  # xgrammar's layout
        self.matchers: Optional["xgrammar.BatchGrammarMatcher"] = None  # made by the first fill
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="grammar-bitmask")

    def start(self, seqs: list["Sequence"]) -> Optional[Future[GrammarMask]]:
        """The mask of `seqs` (one row each, in order) being filled; None when no sequence is constrained."""
        rows = [row for row, seq in enumerate(seqs) if seq.grammar is not None]
        if not rows:
            return None
        return self.executor.submit(self._fill, [seqs[row].grammar for row in rows], rows)

    def _fill(self, matchers: list["xgrammar.GrammarMatcher"], rows: list[int]) -> GrammarMask:
        if self.matchers is None:
            import xgrammar

            self.matchers = xgrammar.BatchGrammarMatcher(max_threads=1)
        bitmask = self.bitmask[: rows[-1] + 1]
        self.matchers.batch_fill_next_token_bitmask(matchers, bitmask, indices=rows)
        return GrammarMask(bitmask, rows)
