"""The Triton prefill attention kernel (query chunks over their cached prefix) against the PyTorch reference."""
from __future__ import annotations

import pytest
import torch

from engine.kernels.prefill_attention import prefill_attention
from paged_kv import DEVICE, TOLERANCE, poisoned_like, random_paged_kv, reference_attention, relative_error

NUM_KV_HEADS = 2


def check_prefill(
    chunks: list[tuple[int, int]], group: int, head_dim: int, block_size: int, dtype: torch.dtype,
    num_decodes: int = 0,
) -> None:
    """`chunks`: (cached prefix, query length) per sequence, after `num_decodes` leading rows the kernel must skip."""
    context_lens = [prefix + query for prefix, query in chunks]
    kv = random_paged_kv(context_lens, NUM_KV_HEADS, head_dim, block_size, dtype)
    query_lens = [query for _, query in chunks]
    query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], device=DEVICE)
    q = torch.randn(sum(query_lens), NUM_KV_HEADS * group, head_dim).to(DEVICE, dtype)
    out = prefill_attention(
        q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, query_start_loc, num_decodes,
        len(chunks) - num_decodes, max(query_lens[num_decodes:]), head_dim**-0.5, out=poisoned_like(q),
    )
    first_row = int(query_start_loc[num_decodes])
    assert out[:first_row].isnan().all(), "rows of the skipped sequences were written"
    assert not out[first_row:].isnan().any()
    for i in range(num_decodes, len(chunks)):
        rows = slice(query_start_loc[i], query_start_loc[i + 1])
        assert relative_error(out[rows], reference_attention(q[rows], kv, i, head_dim**-0.5)) < TOLERANCE[dtype], i


# whole prompts, prompts behind a cached prefix (block-aligned and not), a chunk of a long prompt, one-token tails
MIXED_CHUNKS = [(0, 45), (32, 20), (21, 7), (64, 70), (90, 1), (0, 16)]


@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_over_cached_prefix_matches_reference(group: int, head_dim: int, block_size: int) -> None:
    check_prefill(MIXED_CHUNKS, group, head_dim, block_size, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_matches_reference_in_half_precision(dtype: torch.dtype) -> None:
    check_prefill(MIXED_CHUNKS, 3, 64, 16, dtype)


def test_prefill_leaves_the_decode_rows_of_a_mixed_batch_alone() -> None:
    check_prefill([(40, 1), (17, 1), (0, 33), (50, 12)], 2, 64, 16, torch.float32, num_decodes=2)


def test_prefill_with_a_head_dim_that_is_not_a_power_of_two() -> None:
    check_prefill(MIXED_CHUNKS, 3, 80, 16, torch.float32)
