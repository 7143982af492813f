"""Continuous batching: each step takes running sequences first, then waiting ones, first come first served.

A step spends at most `max_num_batched_tokens` tokens, so long prompts are prefilled in chunks that
share a step with running decodes. When the KV cache runs out, the newest running sequence is
preempted: its blocks are freed and it is recomputed later from its tokens. With prefix caching, a
sibling (n > 1) waits while another sequence of its request prefills their prompt, then joins with
the prompt's blocks as a cache hit (blocks are hittable only once computed).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def completes_prompt(self) -> bool:
        """True when this step computes the sequence's last known token, so a new one is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[ScheduledSeq]:
        """This step's sequences with their token counts; waiting ones join only if nothing was preempted."""
        budget = self.max_num_batched_tokens
        scheduled, num_preempted = self._schedule_running(budget)
        budget -= sum(item.num_new_tokens for item in scheduled)
        if not num_preempted:
            scheduled += self._schedule_waiting(budget)
        return scheduled

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take `seq` out of the queues, mark it finished and release its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.finish(reason)
        self.block_manager.free(seq)

    def _schedule_running(self, budget: int) -> tuple[list[ScheduledSeq], int]:
        scheduled: list[ScheduledSeq] = []
        num_preempted = 0
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                num_preempted += 1
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            index += 1
        return scheduled, num_preempted

    def _schedule_waiting(self, budget: int) -> list[ScheduledSeq]:
        scheduled: list[ScheduledSeq] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            item = self._admit(self.waiting[0], budget)
            if item is None:
                break
            scheduled.append(item)
            budget -= item.num_new_tokens
        return scheduled

    def _admit(self, seq: Sequence, budget: int) -> Optional[ScheduledSeq]:
        """Move `seq`, the queue's head, to running with blocks for up to `budget` tokens; None if it must wait."""
        if self._waits_for_sibling_prefill(seq):
            return None
        cached_prefix = self.block_manager.find_cached_prefix(seq)
        num_new = min(seq.num_tokens - len(cached_prefix) * self.block_manager.block_size, budget)
        if not self.block_manager.allocate(seq, num_new, cached_prefix):
            return None
        self.waiting.popleft()
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return ScheduledSeq(seq, num_new)

    def _waits_for_sibling_prefill(self, seq: Sequence) -> bool:
        """True while another sequence of its request prefills the prompt: its blocks become hits once computed."""
        if not self.block_manager.enable_prefix_caching or seq.num_prompt_tokens <= self.block_manager.block_size:
            return False
        return any(
            other.status == SequenceStatus.RUNNING and other.num_computed_tokens < other.num_prompt_tokens
            for other in seq.request.seqs
        )

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
