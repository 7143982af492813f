"""Tensor-parallel linear layers. With one rank both are plain linear layers over the whole checkpoint tensor.

A column-parallel layer holds some output rows of each checkpoint projection it stacks (q/k/v, gate/up) and
needs no communication; a row-parallel layer holds some input columns and sums its partial outputs over the
ranks.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import TPGroup
from engine.layers.sharding import Partition


class ColumnParallelLinear(nn.Module):
    def __init__(self, input_size: int, parts: list[Partition], bias: bool = False) -> None:
        """`parts`: this rank's rows of each stacked checkpoint projection, in stacking order."""
        super().__init__()
        self.parts = parts
        output_size = sum(part.size for part in parts)
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(output_size), requires_grad=False) if bias else None

    def load(self, kind: str, tensor: Any, part: int = 0) -> None:
        """Copy this rank's rows of checkpoint projection `part` (`kind` "weight" or "bias") into place."""
        rows = self.parts[part]
        expected = (rows.total, self.weight.shape[1]) if kind == "weight" else (rows.total,)
        check_shape(f"{kind} of part {part}", tensor, expected)
        offset = sum(earlier.size for earlier in self.parts[:part])
        getattr(self, kind)[offset : offset + rows.size].copy_(tensor[rows.start : rows.stop])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    def __init__(self, columns: Partition, output_size: int, tp: TPGroup, bias: bool = False) -> None:
        """`columns`: this rank's slice of the input dimension."""
        super().__init__()
        self.columns = columns
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(output_size, columns.size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(output_size), requires_grad=False) if bias else None

    def load(self, kind: str, tensor: Any, part: int = 0) -> None:
        output_size = self.weight.shape[0]
        if kind == "bias":
            check_shape("bias", tensor, (output_size,))
            self.bias.copy_(tensor[:])
            return
        check_shape("weight", tensor, (output_size, self.columns.total))
        self.weight.copy_(tensor[:, self.columns.start : self.columns.stop])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.linear(x, self.weight, self.bias)
        out = self.tp.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


def check_shape(what: str, tensor: Any, expected: tuple[int, ...]) -> None:
    """`tensor` is a torch tensor or a lazily read checkpoint slice; both have `shape`."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{what}: expected shape {tuple(expected)}, got {tuple(tensor.shape)}")
