"""The fused Triton RMSNorm (+ residual) and rotary kernels against the PyTorch layers they replace."""
from __future__ import annotations

import pytest
import torch

from engine.kernels import rms_norm as triton_rms_norm
from engine.kernels import rotary as triton_rotary
from engine.layers.norm import rms_norm
from engine.layers.rotary import RotaryEmbedding, apply_rotary
from paged_kv import DEVICE, TOLERANCE, relative_error

LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden_size", [576, 1024])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_torch(dtype: torch.dtype, hidden_size: int, with_residual: bool) -> None:
    generator = torch.Generator().manual_seed(hidden_size)
    x = torch.randn(2 * 13, hidden_size, generator=generator).to(DEVICE, dtype)[::2]  # strided rows
    residual = torch.randn(13, hidden_size, generator=generator).to(DEVICE, dtype) if with_residual else None
    weight = torch.empty(hidden_size).uniform_(0.5, 1.5, generator=generator).to(DEVICE, dtype)

    out, next_residual = triton_rms_norm.rms_norm(x, residual, weight, 1e-5)
    ref, ref_residual = rms_norm(x, residual, weight, 1e-5)

    assert relative_error(out, ref) < TOLERANCE[dtype]
    # the interpreter rounds float32 to bfloat16 by truncation, so the sum is exact only in the other dtypes
    assert relative_error(next_residual, ref_residual) < (TOLERANCE[dtype] if dtype == torch.bfloat16 else 1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,head_dim", [(3, 64), (10, 128)])
@pytest.mark.parametrize("scaling", [{}, LLAMA3_SCALING])
def test_rotary_matches_torch(dtype: torch.dtype, num_heads: int, head_dim: int, scaling: dict) -> None:
    generator = torch.Generator().manual_seed(num_heads)
    rotary = RotaryEmbedding(head_dim, 1024, 500000.0, scaling).to(DEVICE)
    positions = torch.randint(0, 1024, (17,), generator=generator).to(DEVICE)
    qkv = torch.randn(17, num_heads + 2, head_dim, generator=generator).to(DEVICE, dtype)
    query_key = qkv[:, :num_heads]  # strided rows: q and k heads sliced out of the fused projection
    angles = rotary(positions, dtype)

    out = triton_rotary.apply_rotary(query_key, angles)

    assert relative_error(out, apply_rotary(query_key, angles)) < TOLERANCE[dtype]
    assert out.is_contiguous()
