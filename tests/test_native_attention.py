"""The native CPU paged attention and KV-cache write against the PyTorch reference: decodes (long ones split over
their keys), prefill chunks over a cached prefix, contexts ending mid-block and on a block boundary, GQA 1/3/8,
head_dim 64/128 (and 80, off the vector width), float32 and bfloat16."""
from __future__ import annotations

import pytest
import torch

from engine.attention.torch_backend import write_kv_cache as reference_write_kv_cache
from paged_kv import TOLERANCE, poisoned_like, random_paged_kv, reference_attention, relative_error

NUM_KV_HEADS = 2
# (cached prefix, query length): decodes ending mid-block, on a boundary (32, 64) and past the 512-token split,
# whole prompts, chunks behind a block-aligned and an unaligned prefix, a one-token tail
MIXED_CHUNKS = [(40, 1), (31, 1), (63, 1), (700, 1), (1100, 1), (0, 45), (32, 20), (21, 7), (64, 70), (0, 16)]


def native_attention(q: torch.Tensor, kv, query_lens: list[int], scale: float) -> torch.Tensor:
    query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()])
    out = poisoned_like(torch.empty(q.shape, dtype=q.dtype))
    torch.ops.pagedserve.paged_attention(
        q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, query_start_loc, scale, out
    )
    return out


def check_attention(
    chunks: list[tuple[int, int]], group: int, head_dim: int, block_size: int, dtype: torch.dtype,
    q_row_padding: int = 0,
) -> None:
    context_lens = [prefix + query for prefix, query in chunks]
    kv = random_paged_kv(context_lens, NUM_KV_HEADS, head_dim, block_size, dtype)
    query_lens = [query for _, query in chunks]
    heads = NUM_KV_HEADS * group
    rows = torch.randn(sum(query_lens), heads * head_dim + q_row_padding).to(dtype)
    q = rows[:, : heads * head_dim].view(-1, heads, head_dim)  # strided rows when padded, as q sliced from qkv
    out = native_attention(q, kv, query_lens, head_dim**-0.5)
    assert not out.isnan().any(), "rows left unwritten"
    start = 0
    for i, query_len in enumerate(query_lens):
        rows_of_seq = slice(start, start + query_len)
        reference = reference_attention(q[rows_of_seq], kv, i, head_dim**-0.5)
        assert relative_error(out[rows_of_seq], reference) < TOLERANCE[dtype], i
        start += query_len


@pytest.fixture(autouse=True, scope="module")
def native_ops(native_kernels: None) -> None:
    """Every test here needs the native build (the conftest fixture builds it once per session)."""


@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decodes_and_prefill_chunks_match_the_reference(group: int, head_dim: int, dtype: torch.dtype) -> None:
    check_attention(MIXED_CHUNKS, group, head_dim, 16, dtype)


@pytest.mark.parametrize("block_size", [8, 32])
def test_other_block_sizes(block_size: int) -> None:
    check_attention(MIXED_CHUNKS, 3, 64, block_size, torch.float32)


def test_a_head_dim_off_the_vector_width_takes_the_scalar_path() -> None:
    check_attention(MIXED_CHUNKS, 3, 80, 16, torch.float32)


def test_query_rows_strided_like_a_slice_of_qkv() -> None:
    check_attention(MIXED_CHUNKS, 3, 64, 16, torch.bfloat16, q_row_padding=2 * NUM_KV_HEADS * 64)


def test_a_context_one_token_short_fails_the_comparison() -> None:
    """The check can fail: the kernel told of one token less than the reference reads differs from it."""
    chunks = [(40, 1), (700, 1), (21, 7)]
    kv = random_paged_kv([prefix + query for prefix, query in chunks], NUM_KV_HEADS, 64, 16, torch.float32)
    q = torch.randn(9, NUM_KV_HEADS * 3, 64)
    references = [reference_attention(q[rows], kv, i, 0.125) for i, rows in enumerate([[0], [1], list(range(2, 9))])]
    kv.context_lens -= 1
    out = native_attention(q, kv, [1, 1, 7], 0.125)
    for i, rows in enumerate([[0], [1], list(range(2, 9))]):
        assert relative_error(out[rows], references[i]) > 100 * TOLERANCE[torch.float32], i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_write_matches_the_reference_and_skips_negative_slots(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(6, 3 * 2 * 64, generator=generator).to(dtype)
    k, v = qkv[:, 128:256].view(6, 2, 64), qkv[:, 256:].view(6, 2, 64)  # strided rows, as sliced from qkv
    slots = torch.tensor([5, 17, -1, 0, 31, -1])
    caches = [torch.randn(2, 16, 2, 64, generator=generator).to(dtype) for _ in range(2)]
    expected = [cache.clone() for cache in caches]
    torch.ops.pagedserve.write_kv_cache(k, v, caches[0], caches[1], slots)
    kept = slots >= 0
    reference_write_kv_cache(k[kept], v[kept], expected[0], expected[1], slots[kept])
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
