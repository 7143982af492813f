"""One rank's LoRA slots: LoRA weights beside every adapted linear layer of the model, which adapter each of the
`max_loras` slots holds, and the token-to-slot map of the running step."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from engine.layers.lora import LoRAContext, LoRAKernel, LoRAStep, LoRAWeights
from engine.lora.adapter import LoRAAdapter
from engine.models.llama import LlamaForCausalLM


class LoRASlots:
    def __init__(self, model: LlamaForCausalLM, max_loras: int, max_rank: int, kernel: LoRAKernel) -> None:
        self.model = model
        self.max_rank = max_rank
        self.context = LoRAContext(kernel)
        dtype, device = model.model.norm.weight.dtype, model.lm_head.weight.device
        for linear in model.lora_linears():
            linear.lora = LoRAWeights(
                self.context, max_loras, linear.output_parts, max_rank, linear.in_features, dtype, device
            )
        self.held: list[Optional[int]] = [None] * max_loras  # adapter_id in each slot
        self._last_used = [0] * max_loras
        self._clock = 0

    def assign(self, adapters: list[Optional[LoRAAdapter]]) -> tuple[list[int], list[tuple[int, LoRAAdapter]]]:
        """Each adapter's slot (-1 for None), after loading the adapters no slot holds into slots that none of
        `adapters` needs (empty ones first, then the least recently used); and those loads."""
        wanted = list({adapter.adapter_id: adapter for adapter in adapters if adapter is not None}.values())
        if len(wanted) > len(self.held):
            raise RuntimeError(f"a step uses {len(wanted)} LoRA adapters but there are {len(self.held)} slots")
        slot_of = {a.adapter_id: self.held.index(a.adapter_id) for a in wanted if a.adapter_id in self.held}
        spare = sorted(set(range(len(self.held))) - set(slot_of.values()), key=self._eviction_order)
        loads = [(spare.pop(0), a) for a in wanted if a.adapter_id not in slot_of]
        for slot, adapter in loads:
            self.load(slot, adapter)
            slot_of[adapter.adapter_id] = slot
        self._clock += 1
        for slot in slot_of.values():
            self._last_used[slot] = self._clock
        return [-1 if a is None else slot_of[a.adapter_id] for a in adapters], loads

    def nbytes(self) -> int:
        weights = [linear.lora for linear in self.model.lora_linears()]
        return sum(w.a.numel() * w.a.element_size() + w.b.numel() * w.b.element_size() for w in weights)

    def _eviction_order(self, slot: int) -> tuple[bool, int, int]:
        return self.held[slot] is not None, self._last_used[slot], slot

    @torch.inference_mode()
    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Write this rank's shard of `adapter` into `slot`, B scaled; projections it lacks stay zero."""
        for linear in self.model.lora_linears():
            linear.lora.a[slot].zero_()
            linear.lora.b[slot].zero_()
        for (layer, projection), weights in adapter.projections.items():
            linear, part = self.model.lora_target(layer, projection)
            layout = linear.lora_layout(part)
            rows = slice(part * self.max_rank, part * self.max_rank + weights.rank)
            linear.lora.a[slot, rows] = weights.a[:, layout.in_columns]
            b = (weights.b[layout.out_rows] * weights.scaling).T
            linear.lora.b[slot, rows, layout.out_offset : layout.out_offset + b.shape[1]] = b
        self.held[slot] = adapter.adapter_id

    @contextmanager
    def running(self, token_slots: Optional[torch.Tensor]) -> Iterator[None]:
        """The model's LoRA layers apply `token_slots` (None: no adapter) within the block."""
        dtype = self.model.model.norm.weight.dtype
        self.context.step = None if token_slots is None else LoRAStep(token_slots, dtype)
        try:
            yield
        finally:
            self.context.step = None

