"""Multi-LoRA (punica-style) gather kernels: every token reads the adapter in its own slot, or none (slot -1).

Adapters live in preallocated slots, a [L, PR, K] and b [L, PR, N] (PR = parts * max_rank rows). lora_shrink
computes z[t] = a[slot[t]] @ x[t] into float32, lora_expand_ adds z[t] @ b[slot[t]] to out[t] in place, and
apply_lora_triton does both. One program per (token, block of output columns); a token without a slot writes zeros
(shrink) or leaves its row untouched (expand). Accumulation is in float32 whatever the model dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

SHRINK_BLOCK_R, SHRINK_BLOCK_K = 16, 128  # z columns per program, x features per step
EXPAND_BLOCK_R, EXPAND_BLOCK_N = 16, 128  # z columns per step, out columns per program


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, slots_ptr, z_ptr, K, PR, x_stride, a_stride_slot, a_stride_row, z_stride,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    if slot >= 0:
        a_rows = a_ptr + slot * a_stride_slot + rows[:, None] * a_stride_row
        for k_start in range(0, K, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + token * x_stride + ks, mask=ks < K, other=0.0).to(tl.float32)
            a = tl.load(a_rows + ks[None, :], mask=(rows[:, None] < PR) & (ks[None, :] < K), other=0.0)
            acc += tl.sum(a.to(tl.float32) * x[None, :], axis=1)
    tl.store(z_ptr + token * z_stride + rows, acc, mask=rows < PR)


@triton.jit
def _expand_kernel(
    out_ptr, z_ptr, b_ptr, slots_ptr, N, PR, out_stride, z_stride, b_stride_slot, b_stride_row,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    token = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot < 0:
        return
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    b_columns = b_ptr + slot * b_stride_slot + columns[None, :]
    for r_start in range(0, PR, BLOCK_R):
        rows = r_start + tl.arange(0, BLOCK_R)
        z = tl.load(z_ptr + token * z_stride + rows, mask=rows < PR, other=0.0).to(tl.float32)
        b = tl.load(b_columns + rows[:, None] * b_stride_row, mask=(rows[:, None] < PR) & (columns[None, :] < N),
                    other=0.0)
        acc += tl.sum(z[:, None] * b.to(tl.float32), axis=0)
    out_columns = out_ptr + token * out_stride + columns
    out = tl.load(out_columns, mask=columns < N, other=0.0).to(tl.float32)
    tl.store(out_columns, (out + acc).to(out_ptr.dtype.element_ty), mask=columns < N)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """z [T, PR] float32 with z[t] = a[token_slots[t]] @ x[t] for x [T, K], a [L, PR, K]; 0 where the slot is -1."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    (num_tokens, k), rows = x.shape, a.shape[1]
    z = torch.empty(num_tokens, rows, dtype=torch.float32, device=x.device)
    if num_tokens and rows:
        block_r, block_k = _block(rows, SHRINK_BLOCK_R), _block(k, SHRINK_BLOCK_K)
        _shrink_kernel[(num_tokens, triton.cdiv(rows, block_r))](
            x, a, token_slots, z, k, rows, x.stride(0), a.stride(0), a.stride(1), z.stride(0),
            BLOCK_R=block_r, BLOCK_K=block_k,
        )
    return z


def lora_expand_(out: torch.Tensor, z: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor) -> None:
    """out[t] += z[t] @ b[token_slots[t]] in place for out [T, N] (rows may be strided), z [T, PR], b [L, PR, N];
    rows whose slot is -1 are not touched."""
    assert out.stride(-1) == 1, "out's columns must be contiguous: it is updated in place"
    z = z if z.stride(-1) == 1 else z.contiguous()
    (num_tokens, n), rows = out.shape, b.shape[1]
    if num_tokens and n:
        block_n = _block(n, EXPAND_BLOCK_N)
        _expand_kernel[(num_tokens, triton.cdiv(n, block_n))](
            out, z, b, token_slots, n, rows, out.stride(0), z.stride(0), b.stride(0), b.stride(1),
            BLOCK_R=_block(rows, EXPAND_BLOCK_R), BLOCK_N=block_n,
        )


def apply_lora_triton(
    out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor
) -> None:
    """out[t] += a[slot] @ x[t] @ b[slot] for every token t with a slot (token_slots[t] != -1), in place."""
    lora_expand_(out, lora_shrink(x, a, token_slots), b, token_slots)


def _block(size: int, largest: int) -> int:
    return min(triton.next_power_of_2(max(size, 1)), largest)
