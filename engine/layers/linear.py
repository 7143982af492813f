"""Tensor-parallel linear layers. With one rank both are plain linear layers over the whole checkpoint tensor.

A column-parallel layer holds some output rows of each checkpoint projection it stacks (q/k/v, gate/up) and
needs no communication; a row-parallel layer holds some input columns and sums its partial outputs over the
ranks.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import TPGroup
from engine.layers.lora import LoRALayout, LoRAWeights
from engine.layers.quantization import HoldsCodes
from engine.layers.quantized import is_codes
from engine.layers.sharding import Partition


class PackableMatmul(HoldsCodes):
    """`x @ weight.T + bias`. On CPU in bfloat16, `pack` reorders the weight once into oneDNN's blocked layout, so that
    no matmul pays for that reorder again (twice as fast for one-token steps, faster for batches too); results are
    bit-identical to `F.linear`. A `single_row_matmul` kernel (the native backend's), where set, takes one-row inputs
    over the plain weight, if `pack` kept it. A quantized weight (HoldsCodes) takes the steps of fewer than
    `dense_rows` rows (all steps without a dense copy)."""

    weight: nn.Parameter
    packed_weight: Optional[torch.Tensor] = None
    single_row_matmul: Optional[Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]] = None
    in_features: int
    out_features: int
    lora: Optional[LoRAWeights] = None  # engine.lora.slots.LoRASlots sets it

    def pack(self, keep_plain_weight: bool = False) -> None:
        """Reorder the weight if the platform gains from it; the plain weight is freed unless kept for the native
        one-row matmul or another module (a quantized layer never keeps it: its one-row steps run quantized)."""
        if not can_pack(self.weight):
            return
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
        if not keep_plain_weight or self.quantized is not None:
            self.weight.data = self.weight.data.new_empty(0)

    def matmul(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.quantized is not None and (self.dense_rows is None or x.shape[0] < self.dense_rows):
            return self.quantized.matmul(x, bias)
        if self.single_row_matmul is not None and x.shape[0] == 1 and self.weight.numel():
            return self.single_row_matmul(x, self.weight, bias)
        if self.packed_weight is None:
            return F.linear(x, self.weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, bias, "none", [], "")

    def with_lora(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`out` plus the LoRA products of the step's adapters, if any."""
        return out if self.lora is None else self.lora.apply(out, x)


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.numel() > 0 and weight.device.type == "cpu" and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


class ColumnParallelLinear(PackableMatmul):
    def __init__(self, input_size: int, parts: list[Partition], bias: bool = False) -> None:
        """`parts`: this rank's rows of each stacked checkpoint projection, in stacking order."""
        super().__init__()
        self.parts = parts
        output_size = sum(part.size for part in parts)
        self.in_features, self.out_features = input_size, output_size  # this rank's, whatever `pack` leaves
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(output_size), requires_grad=False) if bias else None

    def load(self, kind: str, tensor: Any, part: int = 0) -> None:
        """Copy this rank's rows of checkpoint projection `part` (`kind` "weight" or "bias") into place."""
        rows = self.parts[part]
        expected = (rows.total, self.weight.shape[1]) if kind == "weight" else (rows.total,)
        check_shape(f"{kind} of part {part}", tensor, expected)
        offset = sum(earlier.size for earlier in self.parts[:part])
        if is_codes(tensor):
            self.stage(tensor[rows.start : rows.stop], offset)
            return
        getattr(self, kind)[offset : offset + rows.size].copy_(tensor[rows.start : rows.stop])

    @property
    def output_parts(self) -> list[int]:
        """This rank's output columns of each stacked checkpoint projection."""
        return [part.size for part in self.parts]

    def lora_layout(self, part: int) -> LoRALayout:
        rows = self.parts[part]
        offset = sum(earlier.size for earlier in self.parts[:part])
        return LoRALayout(slice(None), slice(rows.start, rows.stop), offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.with_lora(self.matmul(x, self.bias), x)


class RowParallelLinear(PackableMatmul):
    def __init__(self, columns: Partition, output_size: int, tp: TPGroup, bias: bool = False) -> None:
        """`columns`: this rank's slice of the input dimension."""
        super().__init__()
        self.columns = columns
        self.tp = tp
        self.in_features, self.out_features = columns.size, output_size  # this rank's, whatever `pack` leaves
        self.weight = nn.Parameter(torch.empty(output_size, columns.size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(output_size), requires_grad=False) if bias else None

    def load(self, kind: str, tensor: Any, part: int = 0) -> None:
        output_size = self.weight.shape[0]
        if kind == "bias":
            check_shape("bias", tensor, (output_size,))
            self.bias.copy_(tensor[:])
            return
        check_shape("weight", tensor, (output_size, self.columns.total))
        if is_codes(tensor):
            self.stage(tensor[:, self.columns.start : self.columns.stop], 0)
            return
        self.weight.copy_(tensor[:, self.columns.start : self.columns.stop])

    @property
    def output_parts(self) -> list[int]:
        return [self.out_features]

    def lora_layout(self, part: int) -> LoRALayout:
        return LoRALayout(slice(self.columns.start, self.columns.stop), slice(None), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """With several ranks each adds its share of the LoRA product to its partial sum before the all-reduce."""
        if self.tp.size == 1:
            return self.with_lora(self.matmul(x, self.bias), x)
        out = self.tp.all_reduce(self.with_lora(self.matmul(x), x))
        return out if self.bias is None else out + self.bias


def check_shape(what: str, tensor: Any, expected: tuple[int, ...]) -> None:
    """`tensor` is a torch tensor or a lazily read checkpoint slice; both have `shape`."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{what}: expected shape {tuple(expected)}, got {tuple(tensor.shape)}")
