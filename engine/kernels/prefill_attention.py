"""Prefill attention over the paged cache: each sequence's query chunk attends causally to its cached prefix and
to itself, all read from the cache (this step's keys are written first). This serves whole prompts, prompts
whose prefix came from the prefix cache, and chunked prefill alike."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from engine.kernels.attention_tiles import attend_kv_tile, cache_scales, dot_options, head_tile


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, context_lens_ptr, query_start_loc_ptr,
    k_scale_ptr, v_scale_ptr, scale, first_seq, head_dim,
    q_stride_token, q_stride_head, out_stride_token, out_stride_head,
    block_table_stride, cache_stride_block, cache_stride_token,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    seq = first_seq + tl.program_id(0)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    context_len = tl.load(context_lens_ptr + seq)
    prefix_len = context_len - query_len
    scale = scale * tl.load(k_scale_ptr)

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < query_len
    query_positions = prefix_len + rows
    dims = tl.arange(0, BLOCK_D)
    q_mask = row_valid[:, None] & (dims[None, :] < head_dim)
    q_offsets = (query_start + rows)[:, None] * q_stride_token + head * q_stride_head + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0)

    # keys past the tile's last query position are masked for every row; a tile past the chunk reads nothing
    kv_end = tl.where(tile * BLOCK_M < query_len, tl.minimum(context_len, prefix_len + (tile + 1) * BLOCK_M), 0)
    max_score = tl.full([BLOCK_M], float("-inf"), tl.float32)
    denominator = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    head_offset = (head // GROUP) * head_dim
    for position in range(0, kv_end, BLOCK_N):
        tokens = position + tl.arange(0, BLOCK_N)
        valid = tokens < kv_end
        visible = valid[None, :] & (tokens[None, :] <= query_positions[:, None])
        max_score, denominator, acc = attend_kv_tile(
            q, max_score, denominator, acc, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * block_table_stride,
            tokens, valid, visible, head_offset, dims, head_dim, scale, cache_stride_block, cache_stride_token,
            BLOCK_SIZE, DOT_PRECISION, UPCAST_DOT,
        )

    out = acc * (tl.load(v_scale_ptr) / tl.where(denominator == 0.0, 1.0, denominator))[:, None]
    out_offsets = (query_start + rows)[:, None] * out_stride_token + head * out_stride_head + dims[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    first_seq: int,
    num_seqs: int,
    max_query_len: int,
    scale: float,
    out: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sequences first_seq .. first_seq+num_seqs-1: their query rows q[query_start_loc[i]:query_start_loc[i+1]]
    [*, Hq, D] are the last tokens of their context_lens[i] cached tokens. Fills those rows of out (default: a new
    tensor like q) and returns it. An fp8 cache reads as its values times k_scale and v_scale [1] (no scale: 1)."""
    num_heads, head_dim = q.shape[1:]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q) if out is None else out
    if num_seqs == 0:
        return out
    block_m = 64 if max_query_len > 32 else 16
    _prefill_kernel[(num_seqs, triton.cdiv(max_query_len, block_m), num_heads)](
        q, k_cache, v_cache, out, block_tables, context_lens, query_start_loc,
        *cache_scales(k_scale, v_scale, q.device), scale, first_seq, head_dim,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0), k_cache.stride(0), k_cache.stride(1),
        GROUP=num_heads // num_kv_heads, BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=head_tile(head_dim),
        BLOCK_SIZE=block_size, **dot_options(q.dtype),
    )
    return out
