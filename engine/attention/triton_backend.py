"""Paged attention with the Triton kernels: the CUDA path. Same contract as torch_backend.paged_attention."""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from engine.attention.metadata import AttentionMetadata
from engine.kernels.decode_attention import decode_attention, decode_num_splits
from engine.kernels.kv_cache_write import write_kv_cache
from engine.kernels.prefill_attention import prefill_attention

CPU_PROGRAMS_WANTED = 4  # the interpreter runs programs one by one: few splits keep tests fast


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
        num_splits = decode_num_splits(
            num_decodes, k_cache.shape[2], metadata.max_decode_context_len, programs_wanted(q.device)
        )
        decode_attention(
            q[:num_decodes], k_cache, v_cache, metadata.block_tables, metadata.context_lens, scale, num_splits,
            out=out[:num_decodes], k_scale=k_scale, v_scale=v_scale,
        )
    num_prefills = metadata.num_seqs - num_decodes
    if num_prefills:
        prefill_attention(
            q, k_cache, v_cache, metadata.block_tables, metadata.context_lens, metadata.query_start_loc,
            num_decodes, num_prefills, metadata.max_prefill_query_len, scale, out=out, k_scale=k_scale, v_scale=v_scale,
        )
    return out


@lru_cache(maxsize=None)
def programs_wanted(device: torch.device) -> int:
    """Decode programs that fill the device: two per streaming multiprocessor."""
    if device.type != "cuda":
        return CPU_PROGRAMS_WANTED
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count
