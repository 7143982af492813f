"""Incremental detokenization: UTF-8-safe text deltas and stop strings that may span tokens."""
from __future__ import annotations

from typing import Any, Optional

from engine.outputs import Logprob
from engine.sampler import TokenLogprobs
from engine.sequence import Sequence

REPLACEMENT_CHAR = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer: Optional[Any]) -> None:
        self.tokenizer = tokenizer

    def append_token(self, seq: Sequence) -> None:
        """Decode the sequence's newest token into its text, then finish it if a stop string appeared."""
        if self.tokenizer is None:
            return
        state = seq.detok
        window = seq.token_ids[state.prefix_offset :]
        skip = seq.params.skip_special_tokens
        prefix_text = self.tokenizer.decode(window[: state.read_offset - state.prefix_offset], skip_special_tokens=skip)
        full_text = self.tokenizer.decode(window, skip_special_tokens=skip)
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            return
        previous_len = len(state.output_text)
        state.output_text += full_text[len(prefix_text) :]
        state.prefix_offset, state.read_offset = state.read_offset, seq.num_tokens
        self._check_stop_strings(seq, previous_len)

    def take_delta(self, seq: Sequence) -> str:
        """Text not yet handed out, holding back a tail that may still grow into a stop string."""
        state = seq.detok
        end = len(state.output_text)
        if not seq.is_finished and seq.params.stop:
            end -= max(len(s) for s in seq.params.stop) - 1
        if end <= state.num_text_emitted:
            return ""
        delta = state.output_text[state.num_text_emitted : end]
        state.num_text_emitted = end
        return delta

    def logprobs(self, entry: TokenLogprobs) -> dict[int, Logprob]:
        result = {entry.token_id: Logprob(entry.logprob, entry.rank, self._decode_one(entry.token_id))}
        for rank, (token_id, logprob) in enumerate(zip(entry.top_ids, entry.top_logprobs), start=1):
            result.setdefault(token_id, Logprob(logprob, rank, self._decode_one(token_id)))
        return result

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""

    def _check_stop_strings(self, seq: Sequence, previous_len: int) -> None:
        text = seq.detok.output_text
        matches = []
        for stop in seq.params.stop:
            index = text.find(stop, max(previous_len - len(stop) + 1, 0))
            if index != -1:
                matches.append((index, stop))
        if matches:
            index, stop = min(matches)
            seq.detok.output_text = text[:index]
            seq.detok.stop_reason = stop
