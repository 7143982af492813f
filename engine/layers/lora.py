"""LoRA on the linear layers for batches that mix adapters (punica-style): every adapter's A and B sit in
preallocated slots, and each token of a step names its slot (-1: the base model alone).

A layer stacking P checkpoint projections (q/k/v, gate/up) holds, per slot, A as [P * max_rank, in] (part p in
rows p * max_rank onwards) and B as [P * max_rank, out], part p's rows reaching only part p's output columns;
the scaling is folded into B. The PyTorch path here, the reference, shrinks the tokens through every slot in use
at once, zeroes what belongs to other slots with a one-hot mask, and expands with one matmul: no loop over
adapters, and the same shapes whatever the adapters of the batch. The native CPU kernel (engine/native/csrc/
lora.cpp) and the Triton kernels (engine/kernels/lora.py) gather each token's own slot instead.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F


@dataclass
class LoRAStep:
    token_slots: torch.Tensor  # [T] int64, -1 where a token runs on the base model alone
    dtype: torch.dtype  # the model's

    @functools.cached_property
    def mapping(self) -> torch.Tensor:
        """[T, num_slots] one-hot in the model's dtype, over slots 0..max(token_slots) (the PyTorch path's mask)."""
        num_slots = int(self.token_slots.max()) + 1
        return (self.token_slots[:, None] == torch.arange(num_slots, device=self.token_slots.device)).to(self.dtype)


class LoRAWeights:
    """One linear layer's slots: A [slots, R, in] and B [slots, R, out], the R rows split evenly between the
    stacked parts, whose output columns end at `part_ends` (this rank's)."""

    def __init__(self, context: "LoRAContext", num_slots: int, part_sizes: list[int], max_rank: int,
                 in_features: int, dtype: torch.dtype, device: torch.device) -> None:
        self.context = context
        self.part_ends = list(itertools.accumulate(part_sizes))
        rows = len(part_sizes) * max_rank
        self.a = torch.zeros(num_slots, rows, in_features, dtype=dtype, device=device)
        self.b = torch.zeros(num_slots, rows, self.part_ends[-1], dtype=dtype, device=device)

    def apply(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        step = self.context.step
        if step is not None:
            self.context.kernel(out, x, self, step)
        return out


def apply_lora(out: torch.Tensor, x: torch.Tensor, weights: LoRAWeights, step: LoRAStep) -> None:
    """out[t] += x[t] A_s^T B_s for each token t of slot s, in place."""
    num_slots = step.mapping.shape[1]
    shrunk = F.linear(x, weights.a[:num_slots].flatten(0, 1)).view(x.shape[0], num_slots, -1)
    shrunk.mul_(step.mapping.unsqueeze(2))
    out.addmm_(shrunk.flatten(1), weights.b[:num_slots].flatten(0, 1))


LoRAKernel = Callable[[torch.Tensor, torch.Tensor, LoRAWeights, LoRAStep], None]


class LoRAContext:
    """Shared by every LoRA layer of a model: the running step's token-to-slot map (None: no adapter in the
    step) and the kernel that applies the slots (KernelBackend.apply_lora)."""

    def __init__(self, kernel: LoRAKernel = apply_lora) -> None:
        self.step: Optional[LoRAStep] = None
        self.kernel = kernel


@dataclass(frozen=True)
class LoRALayout:
    """Where a checkpoint projection's LoRA lands in a layer's slot: its columns of the input (A's columns), its
    rows of the output (B's rows), and where those rows start in this rank's output."""

    in_columns: slice
    out_rows: slice
    out_offset: int
