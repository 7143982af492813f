"""Rotary embedding (half-split layout) of query and key heads in one pass."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, num_heads, half_dim,
    x_stride_token, x_stride_head, angle_stride, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < num_heads) & (dims < half_dim)
    first_ptr = x_ptr + token * x_stride_token + heads * x_stride_head + dims
    first = tl.load(first_ptr, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(first_ptr + half_dim, mask=mask, other=0.0).to(tl.float32)
    angle = token * angle_stride + dims
    cos_first = tl.load(cos_ptr + angle, mask=dims < half_dim, other=0.0).to(tl.float32)
    cos_second = tl.load(cos_ptr + angle + half_dim, mask=dims < half_dim, other=0.0).to(tl.float32)
    sin_first = tl.load(sin_ptr + angle, mask=dims < half_dim, other=0.0).to(tl.float32)
    sin_second = tl.load(sin_ptr + angle + half_dim, mask=dims < half_dim, other=0.0).to(tl.float32)
    out_ptr_first = out_ptr + token * num_heads * 2 * half_dim + heads * 2 * half_dim + dims
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr_first, (first * cos_first - second * sin_first).to(dtype), mask=mask)
    tl.store(out_ptr_first + half_dim, (second * cos_second + first * sin_second).to(dtype), mask=mask)


def apply_rotary(x: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Same contract as engine.layers.rotary.apply_rotary: x [T, heads, D] (rows may be strided) rotated by the
    cos and sin [T, 1, D] of its positions, into a new contiguous tensor."""
    cos, sin = angles
    num_tokens, num_heads, head_dim = x.shape
    if x.stride(2) != 1:
        raise ValueError("apply_rotary needs a unit-stride head dim")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    cos, sin = cos.reshape(num_tokens, head_dim).contiguous(), sin.reshape(num_tokens, head_dim).contiguous()
    if num_tokens:
        _rotary_kernel[(num_tokens,)](
            x, cos, sin, out, num_heads, head_dim // 2, x.stride(0), x.stride(1), head_dim,
            BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        )
    return out
