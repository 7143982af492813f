"""Weight-only quantized matmul, out = x @ w.T with w dequantized tile by tile as it is read: int4 codes two per byte
(column 2j in the low nibble) with a scale and a zero per group of columns, or int8 codes with a scale per output
row (engine/layers/quantized.py, Int4NibbleWeight and Int8Weight)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from engine.kernels.attention_tiles import dot_options, tile_dot

BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 32
INT4_OFFSET = tl.constexpr(8)  # 4-bit codes stand for (code - 8) * scale + zero


@triton.jit
def _weight_tile(w_ptr, scale_ptr, zero_ptr, columns, ks, mask, w_stride, scale_stride, group_size, BITS: tl.constexpr):
    """w.T [BLOCK_K, BLOCK_N] in float32, int4 dequantized; int8 codes as they are (scaled per row later)."""
    if BITS == 4:
        pairs = tl.load(w_ptr + columns[None, :] * w_stride + (ks // 2)[:, None], mask=mask, other=0)
        codes = (pairs >> ((ks % 2) * 4).to(tl.uint8)[:, None]) & 15
        groups = columns[None, :] * scale_stride + (ks // group_size)[:, None]
        scale = tl.load(scale_ptr + groups, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + groups, mask=mask, other=0.0).to(tl.float32)
        return (codes.to(tl.float32) - INT4_OFFSET) * scale + zero
    return tl.load(w_ptr + columns[None, :] * w_stride + ks[:, None], mask=mask, other=0).to(tl.float32)


@triton.jit
def _weight_only_matmul_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, out_ptr, M, N, K, group_size, x_stride, w_stride, scale_stride,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    columns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * x_stride + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K),
                    other=0.0)
        w_mask = (ks[:, None] < K) & (columns[None, :] < N)
        w = _weight_tile(w_ptr, scale_ptr, zero_ptr, columns, ks, w_mask, w_stride, scale_stride, group_size, BITS)
        acc += tile_dot(x, w.to(x.dtype), PRECISION, UPCAST)
    if BITS == 8:
        acc *= tl.load(scale_ptr + columns, mask=columns < N, other=0.0).to(tl.float32)[None, :]
    out_mask = (rows[:, None] < M) & (columns[None, :] < N)
    tl.store(out_ptr + rows[:, None] * N + columns[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w.T for int4 codes `packed` [N, K / 2] with `scales` and `zeros` [N, K / group]."""
    group_size = x.shape[1] // scales.shape[1]
    return _launch(x, packed, scales, zeros, 4, group_size)


def int8_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w.T for int8 codes [N, K] with `scales` [N]."""
    return _launch(x, codes, scales, None, 8, x.shape[1])


def _launch(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], bits: int,
    group_size: int,
) -> torch.Tensor:
    x = x.contiguous()
    (m, k), n = x.shape, codes.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        options = dot_options(x.dtype)
        grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
        _weight_only_matmul_kernel[grid](
            x, codes, scales, scales if zeros is None else zeros, out, m, n, k, group_size, x.stride(0),
            codes.stride(0), scales.stride(0), BITS=bits, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
            PRECISION=options["DOT_PRECISION"], UPCAST=options["UPCAST_DOT"],
        )
    return out
