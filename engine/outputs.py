"""What the engine hands back: per-request outputs, each a list of completions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: Optional[list[dict[int, Logprob]]]
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None

    def add(self, delta: "CompletionOutput") -> None:
        """Fold a later delta of this completion into it (logprobs only while both hold them)."""
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if self.logprobs is not None and delta.logprobs is not None:
            self.logprobs.extend(delta.logprobs)
        self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: Optional[float]
    first_token_time: Optional[float]
    finished_time: Optional[float]
    num_prompt_tokens: int
    num_generation_tokens: int


@dataclass
class RequestOutput:
    """With `delta` outputs (the engine's stream) each completion holds only what is new since the last one."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0

    def add(self, delta: "RequestOutput") -> None:
        """Fold a later delta into this output, making it cumulative."""
        by_index = {out.index: out for out in self.outputs}
        for new in delta.outputs:
            old = by_index.get(new.index)
            if old is None:
                copy = CompletionOutput(new.index, "", [], [] if new.logprobs is not None else None)
                by_index[new.index] = old = copy
                self.outputs.append(copy)
            old.add(new)
        self.outputs.sort(key=lambda out: out.index)
        self.finished = delta.finished
        self.metrics = delta.metrics
        self.num_cached_tokens = delta.num_cached_tokens
