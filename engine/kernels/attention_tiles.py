"""What the decode and prefill attention kernels share: one step of online softmax over a tile of paged KV, and
the precision of its matmuls."""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def tile_dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in float32. UPCAST multiplies half-precision tiles as float32: Triton's interpreter
    misreads bfloat16 in tl.dot. Products of bfloat16 or float16 values are exact in float32, so only the
    summation order differs from the tensor-core path."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


def head_tile(head_dim: int) -> int:
    """The head-dim extent of a tile: a power of two, and at least the 16 tl.dot needs on a GPU."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_options(dtype: torch.dtype) -> dict[str, object]:
    """Constexprs for tile_dot: float32 multiplies in full precision (no TF32), so the float32 engine matches the
    PyTorch path; half precision is upcast only under the interpreter."""
    interpreting = bool(triton.knobs.runtime.interpret)
    return {
        "DOT_PRECISION": "ieee" if dtype == torch.float32 or interpreting else "tf32",
        "UPCAST_DOT": interpreting and dtype != torch.float32,
    }


def cache_scales(
    k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scales [1] the kernels read for a cache (engine.attention.fp8): 1 where there is none."""
    return (_unit_scale(device) if k_scale is None else k_scale), (_unit_scale(device) if v_scale is None else v_scale)


@lru_cache(maxsize=None)
def _unit_scale(device: torch.device) -> torch.Tensor:
    return torch.ones(1, device=device)


@triton.jit
def attend_kv_tile(
    q, max_score, denominator, acc, k_cache_ptr, v_cache_ptr, block_table_ptr, tokens, valid, visible,
    head_offset, dims, head_dim, scale, cache_stride_block, cache_stride_token,
    BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Fold the context `tokens` (loaded where `valid`, through the block table row) into the running softmax of the
    query rows q, each seeing the tokens `visible` [rows, tokens] marks. Returns the new (max_score, denominator,
    acc); the first tile a row folds must have a visible token. An fp8 cache's values are read in q's dtype
    unscaled: `scale` includes the key scale, and the caller multiplies the output by the value scale."""
    block = tl.load(block_table_ptr + tokens // BLOCK_SIZE, mask=valid, other=0)
    cache_rows = block.to(tl.int64) * cache_stride_block + (tokens % BLOCK_SIZE) * cache_stride_token + head_offset
    kv_mask = valid[:, None] & (dims[None, :] < head_dim)
    k = tl.load(k_cache_ptr + cache_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0).to(q.dtype)
    v = tl.load(v_cache_ptr + cache_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0).to(q.dtype)
    scores = tl.where(visible, tile_dot(q, tl.trans(k), PRECISION, UPCAST) * scale, float("-inf"))
    new_max = tl.maximum(max_score, tl.max(scores, axis=1))
    probs = tl.exp(scores - new_max[:, None])
    rescale = tl.exp(max_score - new_max)
    denominator = denominator * rescale + tl.sum(probs, axis=1)
    acc = acc * rescale[:, None] + tile_dot(probs.to(v.dtype), v, PRECISION, UPCAST)
    return new_max, denominator, acc
