"""Continuous batching: running sequences first, then waiting ones by request arrival; the biggest KV consumer yields.

Each step serves the running sequences in the order they were admitted, then admits waiting ones
from the head of the queue until one does not fit or must wait for a sibling. A step spends at most
`max_num_batched_tokens` tokens, so long prompts are prefilled in chunks that share a step with
running decodes.

Fairness, so that a long or wide request cannot starve later small ones:
- The waiting queue is in order of request arrival and is served from its head only.
- When a running sequence needs a KV block and none is free, the victim is the newest (last admitted)
  running sequence of the request holding the most KV blocks; ties: the request that arrived last.
  It loses its blocks, leaves this step if it was scheduled in it, and is recomputed later from its
  tokens. Victims are taken until the sequence fits or is itself the victim: then it waits, and the
  step goes on with the next running sequence.
- A preempted sequence goes back into the waiting queue ahead of every request that arrived after
  its own, so it is readmitted before them.
- A step that preempted admits no waiting sequence: the freed blocks are the running sequences'
  headroom, and filling them would force the next preemption at once. So no sequence is readmitted
  in the step that preempted it.
- With LoRA, a waiting sequence whose adapter is not among the running ones waits while `max_loras` adapters run.
  Sequences of the base model behind it may go ahead (they need no slot); sequences with an adapter may not, so
  the running adapters drain and the waiting one gets its slot.
- With prefix caching, a sibling (n > 1) waits while another sequence of its request prefills their
  prompt, then joins with the prompt's blocks as cache hits (blocks are hittable only once computed).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

from engine.block_manager import BlockManager
from engine.sequence import Request, Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def completes_prompt(self) -> bool:
        """True when this step computes the sequence's last known token, so a new one is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_loras: int = 0
    ) -> None:
        """`max_loras`: distinct LoRA adapters the running sequences may use at once (0: LoRA is off)."""
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_loras = max_loras
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[ScheduledSeq]:
        """This step's sequences with their token counts; waiting ones join only if nothing was preempted."""
        num_preemptions = self.num_preemptions
        scheduled = self._schedule_running()
        if self.num_preemptions == num_preemptions:
            budget = self.max_num_batched_tokens - sum(item.num_new_tokens for item in scheduled)
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

    def _schedule_running(self) -> list[ScheduledSeq]:
        num_new_tokens: dict[Sequence, int] = {}  # in admission order
        budget = self.max_num_batched_tokens
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status != SequenceStatus.RUNNING:
                continue  # preempted earlier in this pass
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            budget += sum(num_new_tokens.pop(victim, 0) for victim in self._make_room(seq, num_new))
            if seq.status == SequenceStatus.RUNNING:
                num_new_tokens[seq] = num_new
                budget -= num_new
        return [ScheduledSeq(seq, num_new) for seq, num_new in num_new_tokens.items()]

    def _make_room(self, seq: Sequence, num_new: int) -> list[Sequence]:
        """Allocate `seq` blocks for `num_new` tokens, preempting until they fit or `seq` is preempted; the victims."""
        victims: list[Sequence] = []
        while seq.status == SequenceStatus.RUNNING and not self.block_manager.allocate(seq, num_new):
            victim = self._choose_victim()
            self._preempt(victim)
            victims.append(victim)
        return victims

    def _choose_victim(self) -> Sequence:
        """The newest running sequence of the request holding the most KV blocks; ties: the newest request."""
        blocks_held: dict[Request, set[int]] = {}
        for seq in self.running:
            blocks_held.setdefault(seq.request, set()).update(seq.block_table)
        request = max(blocks_held, key=lambda r: (len(blocks_held[r]), r.arrival_index))
        return next(seq for seq in reversed(self.running) if seq.request is request)

    def _schedule_waiting(self, budget: int) -> list[ScheduledSeq]:
        """Admit from the queue's head in order; past a sequence waiting for a LoRA slot, only the base model's."""
        scheduled: list[ScheduledSeq] = []
        lora_blocked = False
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if (lora_blocked and seq.request.lora is not None) or self._waits_for_lora_slot(seq):
                lora_blocked = True
                continue
            item = self._admit(seq, budget)
            if item is None:
                break
            scheduled.append(item)
            budget -= item.num_new_tokens
        return scheduled

    def _admit(self, seq: Sequence, budget: int) -> Optional[ScheduledSeq]:
        """Move waiting `seq` to running with blocks for up to `budget` tokens; None if it must wait."""
        if self._waits_for_sibling_prefill(seq):
            return None
        cached_prefix = self.block_manager.find_cached_prefix(seq)
        num_new = min(seq.num_tokens - len(cached_prefix) * self.block_manager.block_size, budget)
        if not self.block_manager.allocate(seq, num_new, cached_prefix):
            return None
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return ScheduledSeq(seq, num_new)

    def _waits_for_sibling_prefill(self, seq: Sequence) -> bool:
        """True while another sequence of its request computes the prompt blocks `seq` could take as cache hits."""
        if not self.block_manager.enable_prefix_caching:
            return False
        block_size = self.block_manager.block_size
        num_shareable = (seq.num_prompt_tokens - 1) // block_size * block_size  # a hit leaves the last token
        return any(
            other.status == SequenceStatus.RUNNING and other.num_computed_tokens < num_shareable
            for other in seq.request.seqs
        )

    def _waits_for_lora_slot(self, seq: Sequence) -> bool:
        lora = seq.request.lora
        if lora is None:
            return False
        running = {other.request.lora.adapter_id for other in self.running if other.request.lora is not None}
        return lora.adapter_id not in running and len(running) >= self.max_loras

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.insert(self._arrival_position(seq), seq)
        self.num_preemptions += 1

    def _arrival_position(self, seq: Sequence) -> int:
        """The waiting-queue index just ahead of the first sequence whose request arrived after `seq`'s."""
        arrival = seq.request.arrival_index
        later = (index for index, other in enumerate(self.waiting) if other.request.arrival_index > arrival)
        return next(later, len(self.waiting))
