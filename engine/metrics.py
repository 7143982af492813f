"""Engine statistics for monitoring: live gauges, running totals, and one record per finished request.

Plain numbers with no exporter attached: whoever serves the engine turns them into its own metrics.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from engine.block_manager import BlockStats
from engine.sequence import Request


@dataclass
class EngineStats:
    """Gauges as of now, and totals since the engine started."""

    num_requests_running: int
    num_requests_waiting: int
    kv_cache_usage: float  # fraction of blocks held by requests; cached blocks no request holds count as free
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    blocks: BlockStats
    lora_requests_running: dict[str, int] = field(default_factory=dict)  # LoRA adapter name -> requests
    lora_requests_waiting: dict[str, int] = field(default_factory=dict)


@dataclass
class FinishedRequestStats:
    """One finished request (any reason, abort included); times in seconds, None where undefined."""

    finish_reasons: list[str]  # one per completion (`n` in all)
    num_prompt_tokens: int
    num_generation_tokens: int
    e2e_latency: float
    queue_time: Optional[float]  # arrival until first scheduled
    time_to_first_token: Optional[float]
    time_per_output_token: Optional[float]  # (finished - first token) / (output tokens - 1) of the longest completion


StatLogger = Callable[[EngineStats, list[FinishedRequestStats]], None]


class RequestCounters:
    """Token totals, and finished-request records kept for a consumer only once `keep_finished` is set."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.keep_finished = False
        self._finished: list[FinishedRequestStats] = []

    def count_token(self, request: Request) -> None:
        """Count one sampled token; a request's prompt counts with its first one."""
        if request.times.first_token is None:
            request.times.first_token = time.monotonic()
            self.prompt_tokens += len(request.prompt_token_ids)
        self.generation_tokens += 1

    def finish(self, request: Request) -> None:
        request.times.finished = now = time.monotonic()
        if self.keep_finished:
            self._finished.append(finished_request_stats(request, now))

    def take_finished(self) -> list[FinishedRequestStats]:
        taken, self._finished = self._finished, []
        return taken


def finished_request_stats(request: Request, finished: float) -> FinishedRequestStats:
    times = request.times
    num_output = max(seq.num_output_tokens for seq in request.seqs)
    return FinishedRequestStats(
        finish_reasons=[seq.finish_reason or "abort" for seq in request.seqs],
        num_prompt_tokens=len(request.prompt_token_ids),
        num_generation_tokens=sum(seq.num_output_tokens for seq in request.seqs),
        e2e_latency=finished - times.arrival,
        queue_time=_between(times.arrival, times.first_scheduled),
        time_to_first_token=_between(times.arrival, times.first_token),
        time_per_output_token=(finished - times.first_token) / (num_output - 1) if num_output > 1 else None,
    )


def _between(start: float, end: Optional[float]) -> Optional[float]:
    return None if end is None else end - start
