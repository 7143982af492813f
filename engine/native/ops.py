"""The native kernels other than attention (fused elementwise ops, the single-row matmul), behind the signatures of
the PyTorch path's functions (KernelBackend)."""
from __future__ import annotations

from typing import Optional

import torch

from engine.layers.lora import LoRAStep, LoRAWeights
from engine.layers.rotary import Angles


def rms_norm(
    x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rms_norm(x + residual), x + residual), as engine.layers.norm.rms_norm."""
    return torch.ops.pagedserve.rms_norm(x.contiguous(), residual, weight, eps)


def apply_rotary(x: torch.Tensor, angles: Angles) -> torch.Tensor:
    """A rotated copy of x [T, heads, D], as engine.layers.rotary.apply_rotary."""
    rotated = x.clone(memory_format=torch.contiguous_format)
    cos, sin = angles
    torch.ops.pagedserve.rotary_(rotated, cos.contiguous(), sin.contiguous())
    return rotated


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return torch.ops.pagedserve.silu_and_mul(gate_up.contiguous())


def single_row_matmul(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T + bias, streaming the plain weight (a decode step of one sequence)."""
    return torch.ops.pagedserve.gemv(x.contiguous(), weight, bias)


def int8_single_row_matmul(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """x [1, K] @ (codes [N, K] * scales [N, 1])^T + bias, streaming the int8 codes (engine.layers.quantized)."""
    return torch.ops.pagedserve.int8_gemv(x.contiguous(), codes, scales, bias)


def apply_lora(out: torch.Tensor, x: torch.Tensor, weights: LoRAWeights, step: LoRAStep) -> None:
    """out += each token's LoRA product, in place, as engine.layers.lora.apply_lora (out is a fresh matmul output)."""
    torch.ops.pagedserve.lora_(out, x.contiguous(), weights.a, weights.b, step.token_slots, weights.part_ends)
