"""The Triton paged decode attention kernel against the PyTorch reference (interpreted on CPU in CI)."""
from __future__ import annotations

import pytest
import torch

from engine.kernels.decode_attention import decode_attention, decode_num_splits
from paged_kv import DEVICE, TOLERANCE, poisoned_like, random_paged_kv, reference_attention, relative_error

NUM_KV_HEADS = 2
# short and long sequences mixed; lengths that end mid-block and on a block boundary of 16 and of 32
CONTEXT_LENS = [1, 37, 64, 16, 130, 96]


def check_decode(
    context_lens: list[int], group: int, head_dim: int, block_size: int, dtype: torch.dtype, num_splits: int
) -> None:
    kv = random_paged_kv(context_lens, NUM_KV_HEADS, head_dim, block_size, dtype)
    q = torch.randn(len(context_lens), NUM_KV_HEADS * group, head_dim).to(DEVICE, dtype)
    scale = head_dim**-0.5
    out = decode_attention(
        q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale, num_splits, out=poisoned_like(q)
    )
    for i in range(len(context_lens)):  # per sequence: a one-token context's large output would hide the rest
        assert relative_error(out[i], reference_attention(q[i : i + 1], kv, i, scale)[0]) < TOLERANCE[dtype], i


@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_matches_reference_across_gqa_head_dims_and_block_sizes(group: int, head_dim: int, block_size: int) -> None:
    check_decode(CONTEXT_LENS, group, head_dim, block_size, torch.float32, num_splits=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_matches_reference_in_half_precision(dtype: torch.dtype) -> None:
    check_decode(CONTEXT_LENS, 3, 64, 16, dtype, num_splits=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_kv_merges_to_the_reference(dtype: torch.dtype) -> None:
    """Five splits over contexts of 1 to 700 tokens: some splits are empty, the merge must ignore them."""
    check_decode([700, 1, 333, 48], 8, 64, 16, dtype, num_splits=5)


def test_padding_rows_with_no_context_give_zeros() -> None:
    """CUDA graphs pad decode batches with rows of context 0: they must come out finite (zeros), split or not."""
    for num_splits in (1, 3):
        kv = random_paged_kv([40, 1], NUM_KV_HEADS, 64, 16, torch.float32)
        kv.context_lens[1] = 0
        q = torch.randn(2, 4, 64, device=DEVICE)
        out = decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.125, num_splits,
                               out=poisoned_like(q))
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert relative_error(out[:1], reference_attention(q[:1], kv, 0, 0.125)) < 1e-5


def test_num_splits_fills_the_device_without_short_splits() -> None:
    assert decode_num_splits(batch=1, num_kv_heads=8, max_context_len=32768, num_programs_wanted=264) == 33
    assert decode_num_splits(batch=64, num_kv_heads=8, max_context_len=4096, num_programs_wanted=264) == 1
    assert decode_num_splits(batch=1, num_kv_heads=8, max_context_len=300, num_programs_wanted=264) == 2
    assert decode_num_splits(batch=1, num_kv_heads=1, max_context_len=10**6, num_programs_wanted=10**4) == 64


def test_decode_with_a_head_dim_that_is_not_a_power_of_two() -> None:
    check_decode(CONTEXT_LENS, 3, 80, 16, torch.float32, num_splits=2)
