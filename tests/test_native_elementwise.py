"""The native RMSNorm (with its residual add), rotary embedding and SiLU * up against their PyTorch references:
equal in float32 up to float rounding, and within one bfloat16 step in bfloat16 (both round where the reference
does)."""
from __future__ import annotations

import pytest
import torch

from engine.layers.activation import silu_and_mul
from engine.layers.norm import rms_norm
from engine.layers.rotary import RotaryEmbedding, apply_rotary
from engine.native import ops

DTYPES = [torch.float32, torch.bfloat16]
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=8e-3, atol=1e-2)}


@pytest.fixture(autouse=True, scope="module")
def native_ops(native_kernels: None) -> None:
    """Every test here needs the native build."""


def random(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [576, 100])  # whole vectors, and a tail
def test_rms_norm_with_and_without_residual(dtype: torch.dtype, with_residual: bool, hidden: int) -> None:
    x, weight = random(37, hidden, dtype=dtype, seed=0), random(hidden, dtype=dtype, seed=1)
    residual = random(37, hidden, dtype=dtype, seed=2) if with_residual else None
    out, summed = ops.rms_norm(x, residual, weight, 1e-5)
    expected_out, expected_sum = rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(summed, expected_sum)
    torch.testing.assert_close(out, expected_out, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_on_stacked_query_and_key_heads(dtype: torch.dtype, head_dim: int) -> None:
    rotary = RotaryEmbedding(head_dim, 4096, 10000.0, {})
    positions = torch.tensor([0, 1, 7, 300, 4095, 12])
    angles = rotary(positions, dtype)
    qkv = random(len(positions), 12 * head_dim, dtype=dtype, seed=3)
    query_key = qkv[:, : 9 * head_dim].view(len(positions), 9, head_dim)  # strided rows, as sliced from qkv
    torch.testing.assert_close(ops.apply_rotary(query_key, angles), apply_rotary(query_key, angles),
                               **TOLERANCE[dtype])


def test_rotary_that_skips_the_sine_fails_the_comparison() -> None:
    rotary = RotaryEmbedding(64, 64, 10000.0, {})
    angles = rotary(torch.arange(1, 9), torch.float32)
    x = random(8, 3, 64, dtype=torch.float32, seed=4)
    no_sine = (angles[0], torch.zeros_like(angles[1]))
    assert not torch.allclose(ops.apply_rotary(x, no_sine), apply_rotary(x, angles), atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [1536, 50])
def test_silu_and_mul(dtype: torch.dtype, size: int) -> None:
    gate_up = random(19, 2 * size, dtype=dtype, seed=5) * 4
    torch.testing.assert_close(ops.silu_and_mul(gate_up), silu_and_mul(gate_up), **TOLERANCE[dtype])
