"""An fp8 KV cache: each layer stores keys and values as value / scale, saturated to the fp8 range and rounded
(to nearest, ties to even), with one scale for its keys and one for its values; reading multiplies by the scale.
A cache in the model's own dtype stores the values as they are."""
from __future__ import annotations

from typing import Optional

import torch

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's torch dtype for EngineConfig.kv_cache_dtype (`auto`: the model's)."""
    return FP8_DTYPES.get(kv_cache_dtype, model_dtype)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES.values()


def quantize(x: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """x / scale (no scale: 1) saturated to the range of fp8 `dtype`, in it."""
    limit = torch.finfo(dtype).max
    scaled = x.float() if scale is None else x.float() / scale
    return scaled.clamp(-limit, limit).to(dtype)


def dequantize(x: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Cache values x in `dtype`: fp8 ones times their scale (no scale: 1), others as they are."""
    if not is_fp8(x.dtype):
        return x
    values = x.float() if scale is None else x.float() * scale
    return values.to(dtype)
