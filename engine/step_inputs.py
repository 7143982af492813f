"""One step's model inputs as flat tensors: what rank 0 builds from the scheduled batch and sends to the workers.

They travel as two broadcasts over the gloo group: a fixed-size header of counts, then one int64 tensor
holding every field; a step that loads LoRA adapters into slots adds a third, their names and folders as JSON.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Optional

import torch

from engine.attention import AttentionMetadata
from engine.distributed import TPGroup
from engine.lora.request import LoRARequest

_STOP = -1
_HEADER_SIZE = 6


@dataclass
class StepInputs:
    """Sequences are laid out decodes first. `sample_indices` are the token rows whose logits are sampled."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, width]
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor
    sample_indices: torch.Tensor
    num_decodes: int
    lora_slots: Optional[torch.Tensor] = None  # [num_seqs]: each sequence's LoRA slot, -1 for none; None: no LoRA
    lora_loads: list[tuple[int, LoRARequest]] = field(default_factory=list)  # adapters rank 0 put in slots

    def token_lora_slots(self) -> Optional[torch.Tensor]:
        """[num_tokens]: each token's LoRA slot; None when no sequence of the step has an adapter."""
        if self.lora_slots is None or not bool((self.lora_slots >= 0).any()):
            return None
        return torch.repeat_interleave(self.lora_slots, self.query_start_loc.diff())

    def metadata(self, block_size: int, device: torch.device) -> AttentionMetadata:
        context_lens_cpu = self.context_lens.tolist()
        return AttentionMetadata(
            slot_mapping=self.slot_mapping.to(device),
            block_tables=self.block_tables.to(device),
            context_lens=self.context_lens.to(device),
            query_start_loc=self.query_start_loc.to(device),
            num_decodes=self.num_decodes,
            block_size=block_size,
            query_start_loc_cpu=self.query_start_loc.tolist(),
            context_lens_cpu=context_lens_cpu,
            max_decode_context_len=max(context_lens_cpu[: self.num_decodes], default=0),
        )

    def send(self, tp: TPGroup) -> None:
        """Rank 0: broadcast these inputs to the other ranks."""
        num_seqs, width = self.block_tables.shape
        loads = _encode_loads(self.lora_loads)
        header = [len(self.input_ids), num_seqs, width, len(self.sample_indices), self.num_decodes, len(loads)]
        tp.broadcast(torch.tensor(header, dtype=torch.long))
        lora_slots = self.lora_slots if self.lora_slots is not None else torch.full((num_seqs,), -1)
        tp.broadcast(torch.cat([getattr(self, f.name).flatten() for f in _TENSOR_FIELDS] + [lora_slots]))
        if len(loads):
            tp.broadcast(loads)

    @staticmethod
    def send_stop(tp: TPGroup) -> None:
        """Rank 0: tell the other ranks there will be no more steps."""
        tp.broadcast(torch.tensor([_STOP] + [0] * (_HEADER_SIZE - 1), dtype=torch.long))

    @classmethod
    def receive(cls, tp: TPGroup) -> Optional["StepInputs"]:
        """Ranks > 0: the next step's inputs, or None when rank 0 stops."""
        header = tp.broadcast(torch.empty(_HEADER_SIZE, dtype=torch.long)).tolist()
        num_tokens, num_seqs, width, num_samples, num_decodes, loads_size = header
        if num_tokens == _STOP:
            return None
        sizes = [num_tokens] * 3 + [num_seqs * width, num_seqs, num_seqs + 1, num_samples, num_seqs]
        flat = tp.broadcast(torch.empty(sum(sizes), dtype=torch.long))
        values = dict(zip([f.name for f in _TENSOR_FIELDS] + ["lora_slots"], flat.split(sizes)))
        values["block_tables"] = values["block_tables"].view(num_seqs, width)
        loads = _decode_loads(tp.broadcast(torch.empty(loads_size, dtype=torch.uint8))) if loads_size else []
        return cls(**values, num_decodes=num_decodes, lora_loads=loads)


_TENSOR_FIELDS = [f for f in fields(StepInputs) if f.name not in ("num_decodes", "lora_slots", "lora_loads")]


def _encode_loads(loads: list[tuple[int, LoRARequest]]) -> torch.Tensor:
    if not loads:
        return torch.empty(0, dtype=torch.uint8)
    text = json.dumps([[slot, lora.name, lora.path] for slot, lora in loads])
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)


def _decode_loads(data: torch.Tensor) -> list[tuple[int, LoRARequest]]:
    return [(slot, LoRARequest(name, path)) for slot, name, path in json.loads(bytes(data.tolist()).decode())]
