"""Scatter this step's keys and values into the paged KV cache."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    k_stride_token, k_stride_head, v_stride_token, v_stride_head,
    num_kv_heads, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
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
    tl.store(k_cache_ptr + cache_offsets, k, mask=mask)
    tl.store(v_cache_ptr + cache_offsets, v, mask=mask)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v [T, Hkv, D] (rows may be strided) into caches [num_blocks, block_size, Hkv, D] at flat slots [T];
    tokens whose slot is negative (padding) are skipped."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if k.stride(2) != 1 or v.stride(2) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("write_kv_cache needs unit-stride head dims and contiguous caches")
    if num_tokens == 0:
        return
    _write_kv_cache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        num_kv_heads, head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )
