"""How a layer's weight becomes quantized once loaded: the engine's settings as a plan, and the layer side that
holds a checkpoint's GroupCodes until the plan decides the format (engine/layers/quantized.py has the formats)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from torch import nn

from engine.layers.quantized import (
    CPU_INT4_ROW_TILE, GroupCodes, QuantizedWeight, concat_rows, int4_fits, kernel_codes, pack_codes, quantize,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizationPlan:
    """EngineConfig's quantization settings, as every layer applies them once its weight is loaded."""

    method: str = "none"
    group_size: int = 32
    dense_rows: Optional[int] = None

    def bits_for(self, codes: Optional[GroupCodes]) -> Optional[int]:
        """The weight's format: None for dense, else 8 or 4 bits (`auto`: the checkpoint's codes, if any)."""
        if self.method == "auto":
            return None if codes is None else codes.bits
        return {"none": None, "int8": 8, "int4": 4}[self.method]


class HoldsCodes(nn.Module):
    """A layer whose checkpoint weight may arrive as GroupCodes: they wait, by first row, until `quantize` decides
    the weight's format. Once quantized, `quantized` holds the weight and `weight` is empty, or holds a dense copy
    of the same values for steps of `dense_rows` rows or more."""

    weight: nn.Parameter
    staged: Optional[dict[int, GroupCodes]] = None
    quantized: Optional[QuantizedWeight] = None
    dense_rows: Optional[int] = None

    def stage(self, codes: GroupCodes, first_row: int) -> None:
        self.staged = {**(self.staged or {}), first_row: codes}

    def quantize(self, plan: QuantizationPlan, needs_rows: bool = False) -> None:
        """Settle the weight's format; `needs_rows`: the weight also serves embedding lookups."""
        codes = self._take_codes()
        bits = plan.bits_for(codes)
        if codes is not None and bits != codes.bits:
            self.weight.copy_(codes.dequantize(self.weight.dtype))
            codes = None
        if bits is None:
            return
        codes = codes if codes is not None else quantize(self.weight, bits, plan.group_size)
        codes = kernel_codes(self._kernel_takes(codes, needs_rows), self.weight.dtype)
        self.quantized = pack_codes(codes, self.weight.dtype, self.weight.device)
        self.dense_rows = plan.dense_rows
        if plan.dense_rows is None:
            self.weight.data = self.weight.data.new_empty(0)
        else:
            self.weight.copy_(codes.dequantize(self.weight.dtype))

    def _take_codes(self) -> Optional[GroupCodes]:
        """The whole weight as codes when every row arrived as codes of one format; otherwise None, with the codes
        that did arrive dequantized into the dense weight."""
        staged, self.staged = self.staged or {}, None
        parts = [staged[row] for row in sorted(staged)]
        formats = {(part.bits, part.group_size, part.zero is None) for part in parts}
        if parts and len(formats) == 1 and sum(part.shape[0] for part in parts) == self.weight.shape[0]:
            return concat_rows(parts)
        for row, part in staged.items():
            self.weight[row : row + part.shape[0]].copy_(part.dequantize(self.weight.dtype))
        return None

    def _kernel_takes(self, codes: GroupCodes, needs_rows: bool) -> GroupCodes:
        """`codes`, or int8 codes of the same weight where the int4 kernel cannot take its shape."""
        if codes.bits == 8:
            return codes
        reason = int4_fits(codes.shape, codes.group_size, self.weight.device)
        if reason is None and needs_rows and self.weight.device.type == "cpu" and codes.shape[0] % CPU_INT4_ROW_TILE:
            reason = f"embedding lookups need a multiple of {CPU_INT4_ROW_TILE} rows, not {codes.shape[0]}"
        if reason is None:
            return codes
        logger.warning("a weight of shape %s stays int8, not int4: %s", codes.shape, reason)
        return quantize(codes.dequantize(), 8, codes.shape[1])
