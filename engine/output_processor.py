"""The one place a step's results advance its sequences, and where requests end: computed tokens, each sampled
token (logprobs, grammar, text), one stop check, and the output deltas."""
from __future__ import annotations

import logging
import time
from typing import Optional

from engine.block_manager import BlockManager
from engine.detokenizer import Detokenizer
from engine.errors import RequestFailedError, RequestTimeoutError
from engine.metrics import RequestCounters
from engine.model_runner import SampledStep
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.sampler import TokenLogprobs
from engine.scheduler import ScheduledSeq, Scheduler
from engine.sequence import Request, Sequence

logger = logging.getLogger(__name__)


class OutputProcessor:
    """Holds the live requests; every sequence's state after a step changes here alone."""

    def __init__(self, scheduler: Scheduler, block_manager: BlockManager, detokenizer: Detokenizer,
                 eos_token_ids: set[int], max_model_len: int) -> None:
        self.scheduler = scheduler
        self.block_manager = block_manager
        self.detokenizer = detokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        self.counters = RequestCounters()

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        for seq in request.seqs:
            self.scheduler.add(seq)

    def update_from_output(self, scheduled: list[ScheduledSeq], step: SampledStep) -> list[RequestOutput]:
        """Advance the scheduled sequences past the step's tokens, then take what it sampled; the output deltas."""
        for item in scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_computed_blocks(item.seq)
        outputs: list[RequestOutput] = []
        for seq, exc in step.failures:
            failure = RequestFailedError(f"sampling failed for this request: {exc}")
            outputs += self.end_early(seq.request, "error", failure)
        for seq, token_id, logprobs in zip(step.seqs, step.sampled.token_ids, step.sampled.logprobs):
            outputs += self._append_token_or_fail(seq, token_id, logprobs)
        return outputs + self._collect_outputs([seq for seq in step.seqs if seq.request.failure is None])

    def abort_expired(self) -> list[RequestOutput]:
        """Finish every request past its deadline with reason "timeout"; their final outputs."""
        now = time.monotonic()
        outputs: list[RequestOutput] = []
        for request in list(self.requests.values()):
            if request.deadline is not None and request.deadline <= now:
                outputs += self.end_early(request, "timeout", RequestTimeoutError(request.timeout))
        return outputs

    def end_early(self, request: Request, reason: str, failure: Exception) -> list[RequestOutput]:
        """Finish a live request with `reason` ("error" or "timeout"): [its final output], whose stream raises
        `failure`; [] if it has ended already (another of its sequences failed first)."""
        if request.failure is not None:
            return []
        logger.warning("request %r ended with finish_reason %r: %s", request.request_id, reason, failure)
        request.failure = failure
        return [self.finish_now(request, reason)]

    def finish_now(self, request: Request, reason: str) -> RequestOutput:
        """Finish the request's unfinished sequences with `reason`, free its blocks and drop it; its final delta."""
        del self.requests[request.request_id]
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, reason)
        self.counters.finish(request)
        return self._make_output(request, request.seqs)

    def _append_token_or_fail(
        self, seq: Sequence, token_id: int, logprobs: Optional[TokenLogprobs]
    ) -> list[RequestOutput]:
        """[] unless handling the token raised: then the final output of its request, failed."""
        if seq.is_finished:  # its request has failed on another of its sequences
            return []
        try:
            self._append_token(seq, token_id, logprobs)
        except Exception as exc:
            logger.exception("handling token %d of request %r failed", token_id, seq.request.request_id)
            failure = RequestFailedError(f"handling its sampled token failed for this request: {exc}")
            return self.end_early(seq.request, "error", failure)
        return []

    def _append_token(self, seq: Sequence, token_id: int, logprobs: Optional[TokenLogprobs]) -> None:
        seq.token_ids.append(token_id)
        self.counters.count_token(seq.request)
        if logprobs is not None:
            seq.logprobs.append(self.detokenizer.logprobs(logprobs))
        if seq.grammar is not None and not seq.grammar.accept_token(token_id):
            raise ValueError(f"token {token_id} breaks the request's structured_outputs grammar")
        reason = self._stop_reason(seq, token_id)
        if reason is not None:
            self.scheduler.finish(seq, reason)

    def _stop_reason(self, seq: Sequence, token_id: int) -> Optional[str]:
        """The single stop check after a token: its finish reason, or None while it goes on. Text is decoded, and
        stop strings looked for, only when no token ended it."""
        params = seq.params
        if token_id in params.stop_token_ids:
            seq.detok.stop_reason = token_id
            return "stop"
        if (token_id in self.eos_token_ids and not params.ignore_eos) or _grammar_ended(seq):
            return "stop"
        self.detokenizer.append_token(seq)
        if seq.detok.stop_reason is not None:
            return "stop"
        if seq.num_output_tokens == params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _collect_outputs(self, sampled_seqs: list[Sequence]) -> list[RequestOutput]:
        by_request: dict[str, list[Sequence]] = {}
        for seq in sampled_seqs:
            by_request.setdefault(seq.request.request_id, []).append(seq)
        outputs = []
        for request_id, seqs in by_request.items():
            request = self.requests[request_id]
            if request.is_finished:
                self.counters.finish(request)
                del self.requests[request_id]
            outputs.append(self._make_output(request, seqs))
        return outputs

    def _make_output(self, request: Request, seqs: list[Sequence]) -> RequestOutput:
        completions = [self._take_delta(seq) for seq in seqs]
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=completions,
            finished=request.is_finished,
            metrics=_request_metrics(request),
            num_cached_tokens=min(seq.num_cached_tokens for seq in request.seqs),
        )

    def _take_delta(self, seq: Sequence) -> CompletionOutput:
        start = seq.num_emitted_tokens
        seq.num_emitted_tokens = seq.num_output_tokens
        return CompletionOutput(
            index=seq.index,
            text=self.detokenizer.take_delta(seq),
            token_ids=seq.output_token_ids[start:],
            logprobs=seq.logprobs[start:] if seq.params.logprobs is not None else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.detok.stop_reason,
        )


def _grammar_ended(seq: Sequence) -> bool:
    """True once the sequence's grammar has accepted its end (the stop token after a complete sentence)."""
    return seq.grammar is not None and seq.grammar.is_terminated()


def _request_metrics(request: Request) -> RequestMetrics:
    times = request.times
    return RequestMetrics(
        arrival_time=times.arrival,
        first_scheduled_time=times.first_scheduled,
        first_token_time=times.first_token,
        finished_time=times.finished,
        num_prompt_tokens=len(request.prompt_token_ids),
        num_generation_tokens=sum(seq.num_output_tokens for seq in request.seqs),
    )
