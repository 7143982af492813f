"""The state of a request and of each of its sequences (one per completion, `n` in all)."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Hashable, Optional, Union

import torch

from engine.lora.adapter import LoRAAdapter
from engine.outputs import Logprob
from engine.sampling_params import SEED_LIMIT, SamplingParams

if TYPE_CHECKING:
    import xgrammar

    from engine.structured_output.grammar import Grammar


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class DetokenizerState:
    output_text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    num_text_emitted: int = 0
    stop_reason: Union[int, str, None] = None


_seq_counter = itertools.count()
_request_counter = itertools.count()


class Sequence:
    def __init__(self, request: "Request", index: int) -> None:
        self.seq_id = next(_seq_counter)
        self.request = request
        self.index = index
        self.params = request.params
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.status = SequenceStatus.WAITING
        self.finish_reason: Optional[str] = None
        self.logprobs: list[dict[int, Logprob]] = []
        self.num_emitted_tokens = 0
        self.detok = DetokenizerState(
            prefix_offset=max(self.num_prompt_tokens - 5, 0), read_offset=self.num_prompt_tokens
        )
        self.generator = _make_generator(self.params.seed, index)
        # Its own grammar state, advanced by every output token: it survives preemption, as the tokens do.
        self.grammar: Optional["xgrammar.GrammarMatcher"] = request.grammar and request.grammar.matcher()

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def finish(self, reason: str) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason

    def reset_for_recompute(self) -> None:
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING


@dataclass
class RequestTimes:
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: Optional[float] = None
    first_token: Optional[float] = None
    finished: Optional[float] = None


class Request:
    def __init__(
        self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int], params: SamplingParams,
        timeout: Optional[float] = None, lora: Optional[LoRAAdapter] = None, grammar: Optional["Grammar"] = None,
    ) -> None:
        self.request_id = request_id
        self.lora = lora  # the adapter it runs with; None: the base model
        self.grammar = grammar  # the compiled constraint of params.structured_outputs
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.times = RequestTimes()
        self.timeout = timeout  # seconds from arrival until the engine aborts it with finish_reason "timeout"
        self.deadline = None if timeout is None else self.times.arrival + timeout  # on the time.monotonic() clock
        self.failure: Optional[Exception] = None  # why it ended with "error" or "timeout": what its stream raises
        self.arrival_index = next(_request_counter)  # arrival order without ties, unlike times.arrival
        self.seqs = [Sequence(self, index) for index in range(params.n)]

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    @property
    def prefix_cache_root(self) -> Optional[Hashable]:
        """Where its blocks' prefix-cache hash chain starts: an adapter's KV never matches another's."""
        return None if self.lora is None else self.lora.cache_key


def _make_generator(seed: Optional[int], index: int) -> Optional[torch.Generator]:
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed((seed + index) % SEED_LIMIT)
    return generator
