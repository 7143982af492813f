"""Paged attention with the native CPU kernels (engine/native). Same contract as torch_backend.paged_attention."""
from __future__ import annotations

from typing import Optional

import torch

from engine.attention.metadata import AttentionMetadata


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
    torch.ops.pagedserve.write_kv_cache(k, v, k_cache, v_cache, metadata.slot_mapping, k_scale, v_scale)
    out = torch.empty(q.shape, dtype=q.dtype)
    torch.ops.pagedserve.paged_attention(
        q, k_cache, v_cache, metadata.block_tables, metadata.context_lens, metadata.query_start_loc, scale, out,
        k_scale, v_scale,
    )
    return out
