"""Linear layers whose weight may stack several projections (q/k/v, gate/up) for one matmul."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__()
        self.output_sizes = output_sizes
        self.weight = nn.Parameter(torch.empty(sum(output_sizes), input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(sum(output_sizes)), requires_grad=False) if bias else None

    def load(self, kind: str, tensor: torch.Tensor, part: int = 0) -> None:
        """Copy a checkpoint tensor (`kind` is "weight" or "bias") into the rows of projection `part`."""
        start = sum(self.output_sizes[:part])
        target = getattr(self, kind)[start : start + self.output_sizes[part]]
        if target.shape != tensor.shape:
            raise ValueError(f"{kind} of part {part}: expected shape {tuple(target.shape)}, got {tuple(tensor.shape)}")
        target.copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
