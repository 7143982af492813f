"""The Triton weight-only int4/int8 matmul against the dequantized weight (interpreted on CPU in CI)."""
from __future__ import annotations

import pytest
import torch

from engine.kernels.quantized_matmul import int4_matmul, int8_matmul
from engine.layers.quantized import Int4NibbleWeight, Int8Weight, kernel_codes, quantize
from paged_kv import DEVICE, TOLERANCE, relative_error

SHAPES = [(1, 96, 64, 32), (5, 200, 128, 64), (33, 64, 256, 32)]  # rows, output features, input features, group


@pytest.mark.parametrize("rows,out_features,in_features,group_size", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_matmul_multiplies_by_the_dequantized_weight(
    rows: int, out_features: int, in_features: int, group_size: int, dtype: torch.dtype
) -> None:
    torch.manual_seed(rows)
    codes = kernel_codes(quantize(torch.randn(out_features, in_features), 4, group_size), dtype)
    weight = Int4NibbleWeight(codes, dtype, DEVICE)
    x = torch.randn(rows, in_features).to(DEVICE, dtype)
    out = int4_matmul(x, weight.packed, weight.scales, weight.zeros)
    assert relative_error(out.float(), x.float() @ codes.dequantize().to(DEVICE).t()) < TOLERANCE[dtype]
    ids = torch.tensor([0, out_features - 1], device=DEVICE)
    assert torch.allclose(weight.rows(ids).float(), codes.dequantize(dtype)[ids.cpu()].float().to(DEVICE))


@pytest.mark.parametrize("rows,out_features,in_features,group_size", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_matmul_multiplies_by_the_dequantized_weight(
    rows: int, out_features: int, in_features: int, group_size: int, dtype: torch.dtype
) -> None:
    torch.manual_seed(rows)
    codes = kernel_codes(quantize(torch.randn(out_features, in_features), 8, in_features), dtype)
    weight = Int8Weight(codes, dtype, DEVICE)
    x = torch.randn(rows, in_features).to(DEVICE, dtype)
    out = int8_matmul(x, weight.codes, weight.scales)
    assert relative_error(out.float(), x.float() @ codes.dequantize().to(DEVICE).t()) < TOLERANCE[dtype]
