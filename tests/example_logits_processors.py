"""A user's logits processor for the tests, loaded by import path (`example_logits_processors:BanTokens`)."""
from __future__ import annotations

import torch

from engine.logits_processors import LogitsProcessor
from engine.sequence import Sequence


class BanTokens(LogitsProcessor):
    """Bans the token ids a request lists in extra_args["ban"]."""

    def applies_to(self, seq: Sequence) -> bool:
        return bool((seq.params.extra_args or {}).get("ban"))

    def apply(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        for row, seq in enumerate(seqs):
            if self.applies_to(seq):
                logits[row, seq.params.extra_args["ban"]] = float("-inf")
