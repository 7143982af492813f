"""Paged decode attention: one query token per sequence over its block table, split-KV (flash-decoding).

Program (sequence, KV head, split) reads one contiguous share of the sequence's context once for all the query
heads of its KV head, with an online softmax in float32. With several splits, each writes its partial output and
log-sum-exp, and a second kernel merges them; with one split the first kernel writes the output itself.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from engine.kernels.attention_tiles import attend_kv_tile, cache_scales, dot_options, head_tile

MIN_SPLIT_TOKENS = 256  # a split shorter than this costs more to merge than it saves
MAX_SPLITS = 64


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, lse_ptr, k_scale_ptr, v_scale_ptr,
    scale, num_splits, head_dim,
    q_stride_seq, q_stride_head, out_stride_seq, out_stride_head, out_stride_split, lse_stride_seq,
    block_table_stride, cache_stride_block, cache_stride_token,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, SINGLE_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(context_len, num_splits), BLOCK_N) * BLOCK_N
    scale = scale * tl.load(k_scale_ptr)
    start = split * split_len
    end = tl.minimum(start + split_len, context_len)

    group = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + group
    dims = tl.arange(0, BLOCK_D)
    q_mask = (group[:, None] < GROUP) & (dims[None, :] < head_dim)
    q = tl.load(q_ptr + seq * q_stride_seq + heads[:, None] * q_stride_head + dims[None, :], mask=q_mask, other=0.0)

    max_score = tl.full([BLOCK_G], float("-inf"), tl.float32)
    denominator = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    head_offset = kv_head * head_dim
    for position in range(start, end, BLOCK_N):
        tokens = position + tl.arange(0, BLOCK_N)
        valid = tokens < end
        max_score, denominator, acc = attend_kv_tile(
            q, max_score, denominator, acc, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * block_table_stride,
            tokens, valid, valid[None, :], head_offset, dims, head_dim, scale, cache_stride_block, cache_stride_token,
            BLOCK_SIZE, DOT_PRECISION, UPCAST_DOT,
        )

    empty = denominator == 0.0  # an empty split, or a padding row with no context
    out = acc * (tl.load(v_scale_ptr) / tl.where(empty, 1.0, denominator))[:, None]
    out_offsets = seq * out_stride_seq + heads[:, None] * out_stride_head + split * out_stride_split + dims[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    if not SINGLE_SPLIT:
        lse = tl.where(empty, float("-inf"), max_score + tl.log(tl.where(empty, 1.0, denominator)))
        tl.store(lse_ptr + seq * lse_stride_seq + heads * num_splits + split, lse, mask=group < GROUP)


@triton.jit
def _merge_splits_kernel(
    partial_ptr, lse_ptr, out_ptr, num_splits, head_dim,
    partial_stride_seq, partial_stride_head, out_stride_seq, out_stride_head,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + (seq * tl.num_programs(1) + head) * num_splits + splits, mask=splits < num_splits,
                  other=float("-inf"))
    top = tl.max(lse, axis=0)
    weights = tl.exp(lse - tl.where(top == float("-inf"), 0.0, top))
    total = tl.sum(weights, axis=0)
    mask = (splits[:, None] < num_splits) & (dims[None, :] < head_dim)
    partial = tl.load(partial_ptr + seq * partial_stride_seq + head * partial_stride_head
                      + splits[:, None] * head_dim + dims[None, :], mask=mask, other=0.0)
    out = tl.sum(partial * weights[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq * out_stride_seq + head * out_stride_head + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < head_dim)


def decode_num_splits(batch: int, num_kv_heads: int, max_context_len: int, num_programs_wanted: int) -> int:
    """Splits per sequence: enough programs to fill the device, none shorter than MIN_SPLIT_TOKENS."""
    wanted = triton.cdiv(num_programs_wanted, batch * num_kv_heads)
    return max(1, min(wanted, triton.cdiv(max_context_len, MIN_SPLIT_TOKENS), MAX_SPLITS))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int,
    out: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """q [B, Hq, D] attends over the first context_lens[b] tokens of block_tables[b] in the caches
    [num_blocks, block_size, Hkv, D]; returns (or fills) out [B, Hq, D]. A context of 0 gives zeros. An fp8 cache
    reads as its values times k_scale and v_scale [1] (no scale: 1)."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q) if out is None else out
    if batch == 0:
        return out
    group = num_heads // num_kv_heads
    single = num_splits == 1
    partial = out if single else q.new_empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32)
    lse = partial if single else q.new_empty(batch, num_heads, num_splits, dtype=torch.float32)
    split_stride = 0 if single else partial.stride(2)
    block_d = head_tile(head_dim)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, partial, lse, *cache_scales(k_scale, v_scale, q.device),
        scale, num_splits, head_dim,
        q.stride(0), q.stride(1), partial.stride(0), partial.stride(1), split_stride, lse.stride(0),
        block_tables.stride(0), k_cache.stride(0), k_cache.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=max(16, min(64, 8192 // block_d)),
        BLOCK_D=block_d, BLOCK_SIZE=block_size, SINGLE_SPLIT=single, **dot_options(q.dtype),
    )
    if not single:
        _merge_splits_kernel[(batch, num_heads)](
            partial, lse, out, num_splits, head_dim,
            partial.stride(0), partial.stride(1), out.stride(0), out.stride(1),
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
        )
    return out
