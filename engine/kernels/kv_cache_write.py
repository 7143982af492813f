"""Scatter this step's keys and values into the paged KV cache (an fp8 cache quantized: engine.attention.fp8)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from engine.attention.fp8 import is_fp8
from engine.kernels.attention_tiles import cache_scales


@triton.jit
def _round_to_fp8_grid(x, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr):
    """Float32 x rounded to nearest, ties to even, on the grid of an fp8 format (MIN_EXPONENT: its smallest normal
    exponent), so that the cast after it is exact (Triton's interpreter rounds to fp8 wrongly): adding 1.5 x 2^23
    times the grid step at x's exponent rounds away every finer bit."""
    exponent = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    step = tl.maximum(exponent, MIN_EXPONENT) - MANTISSA_BITS
    magic = (((step + 150) << 23) | 0x400000).to(tl.float32, bitcast=True)
    return (x + magic) - magic


@triton.jit
def _cache_values(x, scale_ptr, cache_ptr, FP8_MAX: tl.constexpr, MANTISSA_BITS: tl.constexpr,
                  MIN_EXPONENT: tl.constexpr):
    """x as the cache stores it: as is, or in an fp8 cache (FP8_MAX > 0) x / scale saturated to +-FP8_MAX."""
    if FP8_MAX == 0:
        return x
    scaled = tl.minimum(tl.maximum(x.to(tl.float32) / tl.load(scale_ptr), -FP8_MAX), FP8_MAX)
    return _round_to_fp8_grid(scaled, MANTISSA_BITS, MIN_EXPONENT).to(cache_ptr.dtype.element_ty)


@triton.jit
def _write_kv_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
    k_stride_token, k_stride_head, v_stride_token, v_stride_head,
    num_kv_heads, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    FP8_MAX: tl.constexpr, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    heads_to_write = tl.where(slot >= 0, num_kv_heads, 0)
    mask = (heads < heads_to_write) & (dims < head_dim)
    cache_offsets = slot * num_kv_heads * head_dim + heads * head_dim + dims
    k = tl.load(k_ptr + token * k_stride_token + heads * k_stride_head + dims, mask=mask)
    v = tl.load(v_ptr + token * v_stride_token + heads * v_stride_head + dims, mask=mask)
    k = _cache_values(k, k_scale_ptr, k_cache_ptr, FP8_MAX, MANTISSA_BITS, MIN_EXPONENT)
    v = _cache_values(v, v_scale_ptr, v_cache_ptr, FP8_MAX, MANTISSA_BITS, MIN_EXPONENT)
    tl.store(k_cache_ptr + cache_offsets, k, mask=mask)
    tl.store(v_cache_ptr + cache_offsets, v, mask=mask)


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> None:
    """k, v [T, Hkv, D] (rows may be strided) into caches [num_blocks, block_size, Hkv, D] at flat slots [T];
    tokens whose slot is negative (padding) are skipped. An fp8 cache stores value / scale [1] (no scale: 1)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if k.stride(2) != 1 or v.stride(2) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("write_kv_cache needs unit-stride head dims and contiguous caches")
    if num_tokens == 0:
        return
    _write_kv_cache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, *cache_scales(k_scale, v_scale, k.device),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        num_kv_heads, head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        **fp8_format(k_cache.dtype),
    )


def fp8_format(dtype: torch.dtype) -> dict[str, float]:
    """_cache_values' constexprs for a cache of `dtype`: FP8_MAX 0 for a cache in the model's dtype."""
    if not is_fp8(dtype):
        return {"FP8_MAX": 0, "MANTISSA_BITS": 0, "MIN_EXPONENT": 0}
    info = torch.finfo(dtype)
    return {
        "FP8_MAX": info.max, "MANTISSA_BITS": round(-math.log2(info.eps)), "MIN_EXPONENT": round(math.log2(info.tiny))
    }
