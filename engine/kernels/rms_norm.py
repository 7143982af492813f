"""RMSNorm fused with the residual add before it: one read of each row, one write of each result."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, hidden_size, eps,
    x_stride, residual_stride, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    columns = tl.arange(0, BLOCK)
    mask = columns < hidden_size
    x = tl.load(x_ptr + row * x_stride + columns, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_stride + columns, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * hidden_size + columns, x, mask=mask)
    values = x.to(tl.float32)
    inverse_rms = 1.0 / tl.sqrt(tl.sum(values * values, axis=0) / hidden_size + eps)
    normed = (values * inverse_rms).to(x_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + columns, mask=mask, other=0.0)
    out = normed.to(tl.float32) * weight.to(tl.float32)
    tl.store(out_ptr + row * hidden_size + columns, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as engine.layers.norm.rms_norm: (weight * rms_norm(x + residual), x + residual) for x [T, H]."""
    num_tokens, hidden_size = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    residual_out = x if residual is None else torch.empty_like(out)
    if num_tokens:
        _rms_norm_kernel[(num_tokens,)](
            x, x if residual is None else residual, weight, out, residual_out, hidden_size, eps,
            x.stride(0), 0 if residual is None else residual.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden_size),
            num_warps=min(max(triton.next_power_of_2(hidden_size) // 256, 1), 8),
        )
    return out, residual_out
