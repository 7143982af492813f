"""The Triton KV-cache write against the PyTorch scatter: every slot written, padding slots skipped."""
from __future__ import annotations

import pytest
import torch

from engine.attention import torch_backend
from engine.kernels.kv_cache_write import write_kv_cache
from paged_kv import DEVICE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(1, 64, 16), (3, 128, 32), (8, 64, 32)])
def test_write_matches_torch_scatter_and_skips_padding(
    dtype: torch.dtype, num_kv_heads: int, head_dim: int, block_size: int
) -> None:
    num_blocks, num_tokens = 6, 40
    generator = torch.Generator().manual_seed(num_kv_heads)
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens]
    padding = torch.arange(num_tokens) % 7 == 3
    slot_mapping = torch.where(padding, -1, slots).to(DEVICE)
    qkv = torch.randn(num_tokens, 2 + 2 * num_kv_heads, head_dim, generator=generator).to(DEVICE, dtype)
    k, v = qkv[:, 2 : 2 + num_kv_heads], qkv[:, 2 + num_kv_heads :]  # strided rows, as the model passes them
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    v_cache = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    torch_backend.write_kv_cache(k[~padding], v[~padding], expected_k, expected_v, slot_mapping[~padding])

    write_kv_cache(k, v, k_cache, v_cache, slot_mapping)

    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    assert not torch.equal(k_cache, k_cache.new_zeros(shape))
