"""The native single-row matmul (gemv) that decode steps of one sequence run over the plain weights, against
F.linear: float32 and bfloat16, with and without a bias, widths off the vector size; and the engine keeps the plain
weights beside the packed ones only for it. Its int8 twin streams weight-only int8 codes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.layers.quantized import Int8Weight, kernel_codes, quantize
from engine.native.ops import int8_single_row_matmul, single_row_matmul

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2)}


@pytest.fixture(autouse=True, scope="module")
def native_ops(native_kernels: None) -> None:
    """Every test here needs the native build."""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features,in_features", [(960, 576), (49, 1536), (300, 100), (7, 5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_single_row_matmul_matches_linear(dtype: torch.dtype, out_features: int, in_features: int, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(out_features)
    x = torch.randn(1, in_features, generator=generator).to(dtype)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype) if with_bias else None
    torch.testing.assert_close(single_row_matmul(x, weight, bias), F.linear(x, weight, bias), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features,in_features", [(960, 576), (49, 1536), (300, 100), (7, 5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_single_row_matmul_matches_the_dequantized_weight(
    dtype: torch.dtype, out_features: int, in_features: int, with_bias: bool
) -> None:
    generator = torch.Generator().manual_seed(out_features)
    x = torch.randn(1, in_features, generator=generator).to(dtype)
    codes = kernel_codes(quantize(torch.randn(out_features, in_features, generator=generator), 8, in_features), dtype)
    weight = Int8Weight(codes, dtype, torch.device("cpu"))
    bias = torch.randn(out_features, generator=generator).to(dtype) if with_bias else None
    expected = F.linear(x.float(), codes.dequantize(), None if bias is None else bias.float()).to(dtype)
    tolerance = {**TOLERANCE[dtype], "atol": max(TOLERANCE[dtype]["atol"], 1e-4)}  # sums of 1,536 unit products
    torch.testing.assert_close(int8_single_row_matmul(x, weight.codes, weight.scales, bias), expected, **tolerance)


def test_a_weight_row_left_out_fails_the_comparison() -> None:
    x, weight = torch.randn(1, 64), torch.randn(32, 64)
    shifted = single_row_matmul(x, weight[1:], None)
    assert not torch.allclose(shifted, F.linear(x, weight)[:, :31], atol=1e-3)


def test_bfloat16_engine_keeps_plain_weights_only_for_the_native_backend(tiny_model, llm_factory) -> None:
    folder: Path = tiny_model("llama")
    for backend, keeps_plain in (("native", True), ("torch", False)):
        model = llm_factory(folder, dtype="bfloat16", attention_backend=backend, num_kv_blocks=32).engine.runner.model
        qkv = model.model.layers[0].self_attn.qkv_proj
        assert qkv.packed_weight is not None
        assert (qkv.weight.numel() > 0) == keeps_plain
        assert (qkv.single_row_matmul is not None) == keeps_plain
