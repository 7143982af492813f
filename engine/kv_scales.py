"""The scales of an fp8 KV cache (engine.attention.fp8), one for each layer's keys and one for its values.

With `kv_cache_scale` set, every layer uses it. Otherwise each rank measures its own at start-up: one forward over
CALIBRATION_TOKENS fixed pseudo-random token ids, with the attention layers on the PyTorch path, records the largest
|k| and |v| of each layer, and the scale stores HEADROOM times that at the fp8 maximum. Keys and values up to
HEADROOM times larger than the calibration's are then stored unsaturated, while the smallest normal fp8 value still
sits some 10^-4 (e4m3) or 10^-9 (e5m2) below the calibration's largest.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from engine.attention import torch_backend

if TYPE_CHECKING:
    from engine.models.llama import LlamaForCausalLM

CALIBRATION_TOKENS = 256
CALIBRATION_SEED = 0
HEADROOM = 2.0


def calibration_token_ids(vocab_size: int, count: int) -> torch.Tensor:
    """The same `count` token ids on every rank and at every start."""
    return torch.randint(vocab_size, (count,), generator=torch.Generator().manual_seed(CALIBRATION_SEED))


def scale_for(amax: float, dtype: torch.dtype) -> float:
    """The scale that stores HEADROOM x amax at the maximum of fp8 `dtype` (an amax of 0 counts as 1)."""
    return (amax if amax > 0 else 1.0) * HEADROOM / torch.finfo(dtype).max


@contextlib.contextmanager
def recording_kv_amax(model: "LlamaForCausalLM") -> Iterator[list[tuple[float, float]]]:
    """Within it, the model runs its attention layers one by one on the PyTorch path, each forward appending the
    (max |k|, max |v|) of each layer to the list it yields."""
    amax: list[tuple[float, float]] = []

    def record(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *cache_and_metadata: object) -> torch.Tensor:
        amax.append((k.abs().max().item(), v.abs().max().item()))
        return torch_backend.paged_attention(q, k, v, *cache_and_metadata)

    with _layer_by_layer(model, record):
        yield amax


@contextlib.contextmanager
def _layer_by_layer(model: "LlamaForCausalLM", kernel: Callable[..., torch.Tensor]) -> Iterator[None]:
    """Within it, every attention layer runs `kernel`, one by one from Python (no native decoder stack)."""
    layers, stack = model.attention_layers(), model.model.native_stack
    kernels = [layer.kernel for layer in layers]
    model.model.native_stack = None
    for layer in layers:
        layer.kernel = kernel
    try:
        yield
    finally:
        model.model.native_stack = stack
        for layer, saved in zip(layers, kernels):
            layer.kernel = saved
