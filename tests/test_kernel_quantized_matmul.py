"""The Triton weight-only int4/int8 matmul against the dequantized weight (interpreted on CPU in CI)."""
from __future__ import annotations

import pytest
import torch

from engine.kernels.quantized_matmul import int4_matmul, int8_matmul
from engine.layers.quantized import Int4NibbleWeight, Int8Weight, QuantizedWeight, kernel_codes, quantize
from paged_kv import DEVICE, TOLERANCE, relative_error

SHAPES = [(1, 96, 64, 32), (5, 200, 128, 64), (33, 64, 256, 32)]  # rows, output features, input features, group


@pytest.mark.parametrize("rows,out_features,in_features,group_size", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
def test_weight_only_matmul_multiplies_by_the_dequantized_weight(
    rows: int, out_features: int, in_features: int, group_size: int, dtype: torch.dtype, bits: int
) -> None:
    torch.manual_seed(rows)
    group_size = group_size if bits == 4 else in_features
    codes = kernel_codes(quantize(torch.randn(out_features, in_features), bits, group_size), dtype)
    x = torch.randn(rows, in_features).to(DEVICE, dtype)
    weight, out = _triton_matmul(x, codes, dtype)
    assert relative_error(out.float(), x.float() @ codes.dequantize().to(DEVICE).t()) < TOLERANCE[dtype]
    ids = torch.tensor([0, out_features - 1], device=DEVICE)  # the tied embedding's lookup
    assert torch.allclose(weight.rows(ids).float(), codes.dequantize(dtype)[ids.cpu()].float().to(DEVICE))


def _triton_matmul(x: torch.Tensor, codes, dtype: torch.dtype) -> tuple[QuantizedWeight, torch.Tensor]:
    if codes.bits == 4:
        weight = Int4NibbleWeight(codes, dtype, DEVICE)
        return weight, int4_matmul(x, weight.packed, weight.scales, weight.zeros)
    weight = Int8Weight(codes, dtype, DEVICE)
    return weight, int8_matmul(x, weight.codes, weight.scales)
