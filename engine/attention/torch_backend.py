"""Paged attention in plain PyTorch: the CPU path and the reference for the kernels."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from engine.attention.fp8 import dequantize, is_fp8, quantize
from engine.attention.metadata import AttentionMetadata


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> None:
    """Scatter k, v [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D] at flat slots [T]; an fp8 cache
    stores them quantized with its scale (engine.attention.fp8)."""
    _scatter(k, k_cache, slot_mapping, k_scale)
    _scatter(v, v_cache, slot_mapping, v_scale)


def _scatter(x: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, scale: Optional[torch.Tensor]) -> None:
    if is_fp8(cache.dtype):  # index_copy_ takes no fp8: copy the bytes
        x, cache = quantize(x, scale, cache.dtype).view(torch.uint8), cache.view(torch.uint8)
    cache.view(-1, *x.shape[1:]).index_copy_(0, slot_mapping, x)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] over each sequence's cached context; k, v are this step's keys. An fp8
    cache has a scale for its keys and one for its values (engine.attention.fp8)."""
    write_kv_cache(k, v, k_cache, v_cache, metadata.slot_mapping, k_scale, v_scale)
    out = torch.empty_like(q)
    num_decodes = metadata.num_decodes
    if num_decodes:
        rows = metadata.decode_cache_rows(k_cache.shape[2])
        out[:num_decodes] = decode_attention(
            q[:num_decodes], k_cache, v_cache, rows, metadata.decode_padding_mask, scale, k_scale, v_scale
        )
    starts = metadata.query_start_loc_cpu
    for i in range(num_decodes, metadata.num_seqs):
        query = slice(starts[i], starts[i + 1])
        context_len = metadata.context_lens_cpu[i]
        if starts[i + 1] - starts[i] == context_len and k_cache.dtype == q.dtype:
            keys, values = k[query], v[query]
        else:
            keys = dequantize(_gather_context(k_cache, metadata.block_tables[i], context_len), k_scale, q.dtype)
            values = dequantize(_gather_context(v_cache, metadata.block_tables[i], context_len), v_scale, q.dtype)
        out[query] = prefill_attention(q[query], keys, values, scale)
    return out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    padding_mask: torch.Tensor,
    scale: float,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One query token per sequence, q [B, Hq, D], over its context [B, L] (`padding_mask` marks the padding).

    `rows` (AttentionMetadata.decode_cache_rows) index the caches viewed as [slots * Hkv, D]: gathering them yields
    keys already laid out [B, Hkv, L, D] for the batched matmul.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    keys = dequantize(k_cache.view(-1, head_dim).index_select(0, rows), k_scale, q.dtype)
    values = dequantize(v_cache.view(-1, head_dim).index_select(0, rows), v_scale, q.dtype)
    keys = keys.view(batch, num_kv_heads, -1, head_dim)
    values = values.view(batch, num_kv_heads, -1, head_dim)
    grouped = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scale
    scores.masked_fill_(padding_mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype)
    return torch.matmul(probs, values).reshape(batch, num_heads, head_dim)


def prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Queries [Lq, Hq, D] are the last Lq of the Lk context positions in keys/values [Lk, Hkv, D]."""
    query_len, context_len = q.shape[0], keys.shape[0]
    mask = None
    if query_len != context_len:
        query_pos = torch.arange(context_len - query_len, context_len, device=q.device)
        mask = torch.arange(context_len, device=q.device)[None, :] <= query_pos[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        keys.transpose(0, 1).unsqueeze(0),
        values.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(0).transpose(0, 1)


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    block_size = cache.shape[1]
    blocks = cache.index_select(0, block_table[: -(-context_len // block_size)])
    return blocks.flatten(0, 1)[:context_len]
