"""The largest response a request can produce, bounded before it runs, so that no reply outgrows what
TorchServe's frontend accepts from the worker (`max_response_size`; a larger one makes it restart the worker)."""
from __future__ import annotations

import json
from typing import Any, Optional

ENVELOPE_BYTES = 512  # id, object, created, model, usage
CHOICE_BYTES = 256  # index, finish_reason, stop_reason, role
# One log-probability candidate: the token twice (as text and as a list of byte values, up to 5 characters per
# byte), a float and the field names.
CANDIDATE_FIELD_BYTES = 96


class ResponseBudget:
    def __init__(self, tokenizer: Any, max_response_bytes: int) -> None:
        self.max_response_bytes = max_response_bytes
        self.token_bytes = _longest_token_json(tokenizer)

    def worst_case(self, num_choices: int, max_tokens: int, logprobs: Optional[int]) -> int:
        """Bytes of a whole response with `num_choices` choices of `max_tokens` tokens each, at worst."""
        per_token = self.token_bytes
        if logprobs is not None:
            per_token += (logprobs + 1) * (6 * self.token_bytes + CANDIDATE_FIELD_BYTES)
        return ENVELOPE_BYTES + num_choices * (CHOICE_BYTES + max_tokens * per_token)

    def check(self, num_choices: int, max_tokens: int, logprobs: Optional[int]) -> None:
        """ValueError stating the figures when the worst case exceeds the limit."""
        worst = self.worst_case(num_choices, max_tokens, logprobs)
        if worst > self.max_response_bytes:
            raise ValueError(
                f"the response to this request could reach {worst} bytes ({num_choices} choice(s) x {max_tokens} "
                f"tokens{'' if logprobs is None else f' with {logprobs} top logprobs'}), more than the "
                f"{self.max_response_bytes} bytes this server sends in one reply (handler.limits.max_response_bytes); "
                "lower max_tokens, n or logprobs, or stream the response"
            )


def _longest_token_json(tokenizer: Any) -> int:
    """The most JSON bytes one token's text can take: its longest decoded form, escaped, plus a margin for
    characters that only complete with the next token."""
    if tokenizer is None:
        return 8
    texts = tokenizer.batch_decode([[token_id] for token_id in range(len(tokenizer))])
    return max(len(json.dumps(text, ensure_ascii=False).encode("utf-8", "replace")) for text in texts) + 8
