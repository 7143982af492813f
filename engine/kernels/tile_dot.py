"""The tile matmul both attention kernels use, and how its precision is chosen."""
from __future__ import annotations

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


def dot_options(dtype: torch.dtype) -> dict[str, object]:
    """Constexprs for tile_dot: float32 multiplies in full precision (no TF32), so the float32 engine matches the
    PyTorch path; half precision is upcast only under the interpreter."""
    interpreting = bool(triton.knobs.runtime.interpret)
    return {
        "DOT_PRECISION": "ieee" if dtype == torch.float32 or interpreting else "tf32",
        "UPCAST_DOT": interpreting and dtype != torch.float32,
    }
