"""One step's model inputs as flat tensors: what rank 0 builds from the scheduled batch and sends to the workers.

They travel as two broadcasts over the gloo group: a fixed-size header of counts, then one int64 tensor
holding every field.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from engine.attention import AttentionMetadata
from engine.distributed import TPGroup

_STOP = -1


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
        header = [len(self.input_ids), num_seqs, width, len(self.sample_indices), self.num_decodes]
        tp.broadcast(torch.tensor(header, dtype=torch.long))
        tp.broadcast(torch.cat([getattr(self, f.name).flatten() for f in _TENSOR_FIELDS]))

    @staticmethod
    def send_stop(tp: TPGroup) -> None:
        """Rank 0: tell the other ranks there will be no more steps."""
        tp.broadcast(torch.tensor([_STOP, 0, 0, 0, 0], dtype=torch.long))

    @classmethod
    def receive(cls, tp: TPGroup) -> Optional["StepInputs"]:
        """Ranks > 0: the next step's inputs, or None when rank 0 stops."""
        header = tp.broadcast(torch.empty(5, dtype=torch.long)).tolist()
        num_tokens, num_seqs, width, num_samples, num_decodes = header
        if num_tokens == _STOP:
            return None
        sizes = [num_tokens] * 3 + [num_seqs * width, num_seqs, num_seqs + 1, num_samples]
        flat = tp.broadcast(torch.empty(sum(sizes), dtype=torch.long))
        values = dict(zip((f.name for f in _TENSOR_FIELDS), flat.split(sizes)))
        values["block_tables"] = values["block_tables"].view(num_seqs, width)
        return cls(**values, num_decodes=num_decodes)


_TENSOR_FIELDS = [f for f in fields(StepInputs) if f.name != "num_decodes"]
