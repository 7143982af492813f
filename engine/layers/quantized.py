"""Weight-only quantized matmul weights: int8 with a scale per output channel, int4 with a scale and a zero per
group of input columns. Activations stay in the model's dtype; each matmul dequantizes as it reads the weight.

A checkpoint's weight arrives either dense (quantized here, at load) or as `GroupCodes` (a GGUF file's Q4_0, Q4_1
or Q8_0 blocks, whose codes are kept as they are). `pack_codes` turns codes into the device's kernel format: on the
CPU ATen's weight-only kernels, on CUDA the Triton kernel of engine/kernels/quantized_matmul.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

INT4_OFFSET = 8  # 4-bit codes 0..15 stand for (code - 8) * scale + zero
INT4_GROUP_SIZES = (32, 64, 128, 256)
CPU_INT4_ROW_MULTIPLE = 16  # ATen's int4 packing takes whole tiles of 16 output rows
CPU_INT4_ROW_TILE = 64  # ...laid out in tiles of 64 rows when the count allows: see Int4CpuWeight.rows


@dataclass
class GroupCodes:
    """A weight [N, K] as integer codes with a float32 scale (and, for 4 bits, a zero) per group of columns:
    w = (code - offset) * scale + zero, offset 8 for 4-bit codes (uint8, 0..15) and 0 for 8-bit ones (int8)."""

    bits: int
    codes: torch.Tensor
    scale: torch.Tensor
    zero: Optional[torch.Tensor] = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scale.shape[1]

    def __getitem__(self, index: Union[slice, tuple[slice, slice]]) -> "GroupCodes":
        """Rows, or rows and columns; a column slice must hold whole groups."""
        rows, columns = index if isinstance(index, tuple) else (index, slice(None))
        start, stop, _ = columns.indices(self.codes.shape[1])
        if start % self.group_size or (stop - start) % self.group_size:
            raise ValueError(f"columns {start}:{stop} split the quantization groups of {self.group_size} columns")
        groups = slice(start // self.group_size, stop // self.group_size)
        return self.map(lambda t: t[rows, groups], lambda t: t[rows, columns])

    def map(self, on_groups: Callable[[torch.Tensor], torch.Tensor],
            on_codes: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> "GroupCodes":
        """The same codes with `on_codes` applied to the codes and `on_groups` to the scales and zeros."""
        zero = None if self.zero is None else on_groups(self.zero)
        return GroupCodes(self.bits, (on_codes or on_groups)(self.codes), on_groups(self.scale), zero)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        offset = INT4_OFFSET if self.bits == 4 else 0
        grouped = (self.codes.float() - offset).view(self.codes.shape[0], -1, self.group_size)
        values = grouped * self.scale.unsqueeze(-1)
        if self.zero is not None:
            values += self.zero.unsqueeze(-1)
        return values.view(self.codes.shape).to(dtype)


def concat_rows(parts: list[GroupCodes]) -> GroupCodes:
    first = parts[0]
    zero = None if first.zero is None else torch.cat([part.zero for part in parts])
    return GroupCodes(first.bits, torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]), zero)


def quantize(weight: torch.Tensor, bits: int, group_size: int) -> GroupCodes:
    """int8: symmetric, one scale per output channel; int4: asymmetric (min to max) per group of columns."""
    weight = weight.float()
    if bits == 8:
        scale = (weight.abs().amax(dim=1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        return GroupCodes(8, torch.round(weight / scale).clamp(-127, 127).to(torch.int8), scale)
    grouped = weight.view(weight.shape[0], -1, group_size)
    low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round((grouped - low.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 15)
    return GroupCodes(4, codes.to(torch.uint8).view(weight.shape), scale, low + INT4_OFFSET * scale)


def kernel_codes(codes: GroupCodes, dtype: torch.dtype) -> GroupCodes:
    """The codes as the kernels take them: one scale per output channel for 8 bits (grouped 8-bit codes, GGUF's
    Q8_0, are requantized), scales and zeros rounded to the activations' dtype."""
    if codes.bits == 8 and codes.group_size != codes.shape[1]:
        codes = quantize(codes.dequantize(), 8, codes.shape[1])
    return codes.map(lambda t: t.to(dtype).float(), on_codes=lambda t: t)


class QuantizedWeight:
    """A packed quantized weight [N, K] for one device's kernel."""

    out_features: int
    in_features: int
    dtype: torch.dtype

    def matmul(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self._matmul(x)
        return out if bias is None else out + bias

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The dequantized rows `ids` (an embedding lookup from a tied LM head)."""
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        """The tensors it holds; on the CPU (codes, scales), as the native decoder stack takes them."""
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class Int8Weight(QuantizedWeight):
    """Codes [N, K] and scales [N]. A `single_row_matmul` kernel (the native backend's), where set, takes one-row
    inputs."""

    single_row_matmul: Optional[Callable[..., torch.Tensor]] = None

    def __init__(self, codes: GroupCodes, dtype: torch.dtype, device: torch.device) -> None:
        self.codes = codes.codes.to(device)
        self.scales = codes.scale.view(-1).to(dtype=dtype, device=device)
        self.out_features, self.in_features = codes.shape
        self.dtype = dtype

    def matmul(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.single_row_matmul is not None and x.shape[0] == 1:
            return self.single_row_matmul(x, self.codes, self.scales, bias)
        return super().matmul(x, bias)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda":
            from engine.kernels.quantized_matmul import int8_matmul

            return int8_matmul(x, self.codes, self.scales)
        return torch.ops.aten._weight_int8pack_mm(x, self.codes, self.scales)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.codes[ids].to(self.dtype) * self.scales[ids].unsqueeze(-1)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scales]


class Int4CpuWeight(QuantizedWeight):
    """ATen's CPU layout: codes packed two per byte by `_convert_weight_to_int4pack_for_cpu`, and
    scales_and_zeros [K / group, N, 2]."""

    def __init__(self, codes: GroupCodes, dtype: torch.dtype) -> None:
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.codes.to(torch.int32), 1)
        self.scales_and_zeros = torch.stack([codes.scale, codes.zero], dim=-1).transpose(0, 1).to(dtype).contiguous()
        self.out_features, self.in_features = codes.shape
        self.group_size = codes.group_size
        self.dtype = dtype

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Tiles of 64 rows hold, for each column k, 32 bytes: row r's code in byte r % 32, low nibble for r < 32."""
        if self.out_features % CPU_INT4_ROW_TILE:
            raise ValueError(f"int4 row lookup needs a multiple of {CPU_INT4_ROW_TILE} rows, not {self.out_features}")
        tiles = self.packed.view(-1, self.in_features, CPU_INT4_ROW_TILE // 2)
        half = CPU_INT4_ROW_TILE // 2
        in_tile = ids % CPU_INT4_ROW_TILE
        pairs = tiles[ids // CPU_INT4_ROW_TILE, :, in_tile % half]
        codes = (pairs >> (4 * (in_tile // half)).unsqueeze(-1).to(torch.uint8)) & 15
        scale_zero = self.scales_and_zeros[:, ids].transpose(0, 1)
        grouped = (codes.float() - INT4_OFFSET).view(len(ids), -1, self.group_size)
        values = grouped * scale_zero[..., 0:1].float() + scale_zero[..., 1:2].float()
        return values.view(len(ids), -1).to(self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scales_and_zeros]


class Int4NibbleWeight(QuantizedWeight):
    """Two codes per byte, column 2j in the low nibble and 2j + 1 in the high one, scales and zeros [N, K / group]:
    the Triton kernel's layout (CUDA)."""

    def __init__(self, codes: GroupCodes, dtype: torch.dtype, device: torch.device) -> None:
        pairs = codes.codes.view(codes.shape[0], -1, 2)
        self.packed = (pairs[..., 0] | (pairs[..., 1] << 4)).to(device)
        self.scales = codes.scale.to(dtype=dtype, device=device)
        self.zeros = codes.zero.to(dtype=dtype, device=device)
        self.out_features, self.in_features = codes.shape
        self.dtype = dtype

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        from engine.kernels.quantized_matmul import int4_matmul

        return int4_matmul(x, self.packed, self.scales, self.zeros)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        pairs = self.packed[ids]
        codes = torch.stack([pairs & 15, pairs >> 4], dim=-1).view(len(ids), -1)
        return GroupCodes(4, codes, self.scales[ids].float(), self.zeros[ids].float()).dequantize(self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scales, self.zeros]


def int4_fits(codes_shape: tuple[int, int], group_size: int, device: torch.device) -> Optional[str]:
    """None when the int4 kernel takes a weight of this shape, else why not."""
    rows, columns = codes_shape
    if group_size not in INT4_GROUP_SIZES or columns % group_size:
        return f"{columns} input columns in groups of {group_size} (groups of {INT4_GROUP_SIZES} only)"
    if device.type == "cpu" and rows % CPU_INT4_ROW_MULTIPLE:
        return f"{rows} output rows, not a multiple of {CPU_INT4_ROW_MULTIPLE}"
    return None


def pack_codes(codes: GroupCodes, dtype: torch.dtype, device: torch.device) -> QuantizedWeight:
    """`codes` as `kernel_codes` returns them, packed for `device`."""
    if codes.bits == 8:
        return Int8Weight(codes, dtype, device)
    if device.type == "cuda":
        return Int4NibbleWeight(codes, dtype, device)
    return Int4CpuWeight(codes, dtype)


def is_codes(tensor: Any) -> bool:
    return isinstance(tensor, GroupCodes)
